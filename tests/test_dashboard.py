"""The dashboard's server over HTTP (a real uvicorn on 127.0.0.1, real SQLite): what it shows, that
it never writes, the Host check and the token, no file outside the lab's folders, capped logs, live
events; and `report --html`. The browser side is in test_dashboard_browser.py."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from html import unescape
from pathlib import Path

import pytest
import requests
from conftest import run_cli

from autoresearch.lab import Lab, init_lab
from autoresearch.ledger import Ledger, LedgerError
from autoresearch.web import data
from autoresearch.web.export import render_html, script_json
from autoresearch.web.server import make_app

PATCH = "diff --git a/train.py b/train.py\n--- a/train.py\n+++ b/train.py\n@@ -1 +1 @@\n-LR = 0.01\n+LR = 0.02\n"


def fill(lab: Lab) -> dict[str, int]:
    """A small night: a baseline and its repeat, a keep, a discard, a crash with a log, one running."""
    logs = lab.logs
    logs.mkdir(parents=True, exist_ok=True)
    (logs / "00004.log").write_text("step 1\nTraceback: boom\n", encoding="utf-8")
    with Ledger(lab.ledger_path) as ledger:
        run = ledger.start_run("night", "hparam", {"budget": 60, "startup_allowance": 10, "eval_allowance": 10,
                                                    "workers": [{"name": "w0", "node": "local", "runs_on": "cpu x2"}]})
        common = dict(run_id=run, tag="night", agent="hparam", parent_commit="a" * 40)
        ids = {}
        ids["base"] = ledger.add(**common, kind="baseline", description="baseline", status="keep", outcome="ok",
                                 metric=1.0, commit_sha="b" * 40, run_seconds=60, finished_at=time.time())
        ids["repeat"] = ledger.add(**common, kind="repeat", description="repeat", status="measured", outcome="ok",
                                   metric=1.002, repeat_of=ids["base"], run_seconds=60, sigma=0.002)
        ids["keep"] = ledger.add(**common, kind="experiment", description="raise LR", status="keep", outcome="ok",
                                 metric=0.98, champion_metric=1.001, sigma=0.002, patch=PATCH, commit_sha="c" * 40,
                                 rationale="faster", reason="better by 0.021", run_seconds=60, test_metric=0.99)
        ids["discard"] = ledger.add(**common, kind="experiment", description="lower LR", status="discard", outcome="ok",
                                    metric=0.985, champion_metric=0.98, sigma=0.002, patch=PATCH, commit_sha="d" * 40,
                                    reason="within the noise", run_seconds=60)
        ids["crash"] = ledger.add(**common, kind="experiment", description="break it", status="crash", outcome="crash",
                                  patch=PATCH, commit_sha="e" * 40, reason="exit code 1", log_path=str(logs / "00004.log"))
        ids["running"] = ledger.add(**common, kind="experiment", description="now running", status="running",
                                    patch=PATCH, commit_sha="f" * 40, started_at=time.time(), worker="w0", node="local")
    return ids


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return init_lab(tmp_path / "lab", preset="tiny")


class Served:
    def __init__(self, app: object) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))  # type: ignore[arg-type]
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def get(self, path: str, **kw: object) -> requests.Response:
        return requests.get(self.url + path, timeout=30, allow_redirects=False, **kw)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def served(lab: Lab) -> Iterator[tuple[Served, dict[str, int]]]:
    ids = fill(lab)
    s = Served(make_app(lab))
    yield s, ids
    s.stop()


def test_the_state_has_the_figures_the_overview_shows(served: tuple[Served, dict[str, int]]) -> None:
    s, ids = served
    state = s.get("/api/state").json()
    assert state["tag"] == "night" and state["tags"] == ["night"]
    assert state["experiments"] == 5 and state["repeats"] == 1
    assert state["counts"] == {"keep": 2, "discard": 1, "crash": 1, "running": 1}
    assert state["champion"]["id"] == ids["keep"] and state["champion"]["metric"] == pytest.approx(0.98)
    assert state["baseline"]["metric"] == pytest.approx(1.001) and state["baseline"]["runs"] == 2
    assert [c["id"] for c in state["lineage"]] == [ids["base"], ids["keep"]]
    assert state["lineage"][1]["gain"] == pytest.approx(0.021)
    # the chart: the finished experiments, the champion line, the noise band (k=2, σ=0.002), the test split
    points = state["chart"]["points"]
    assert [p["id"] for p in points] == [ids["base"], ids["keep"], ids["discard"], ids["crash"]]
    band = {i: (lo, hi) for i, lo, hi in state["chart"]["band"]}
    assert band[2] == (pytest.approx(0.976), pytest.approx(0.984))
    assert state["chart"]["test"] == [[1, 0.99]]
    (worker,) = state["workers"]
    assert worker["name"] == "w0" and worker["experiment"] == ids["running"] and worker["budget"] == 60
    assert worker["device"] == "cpu x2"
    assert [r["id"] for r in state["rows"]][0] == ids["running"]  # newest first


def test_pages_are_served_with_a_policy_that_forbids_inline_scripts(served: tuple[Served, dict[str, int]]) -> None:
    s, ids = served
    for path in ("/", f"/e/{ids['keep']}", "/api/state", "/static/app.js"):
        r = s.get(path)
        assert r.status_code == 200, path
        policy = r.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy
        assert r.headers["x-content-type-options"] == "nosniff"
    page = s.get(f"/e/{ids['keep']}").text
    assert "raise LR" in page and "faster" in page and 'class="gi"' in page  # the diff, highlighted
    assert s.get(f"/e/{ids['crash']}").text.count("Traceback: boom") == 1
    assert s.get("/e/999999").status_code == 404
    assert s.get("/api/log/999999").status_code == 404


def test_the_server_never_writes_the_ledger(served: tuple[Served, dict[str, int]], lab: Lab) -> None:
    s, ids = served
    before = hashlib.sha256(lab.ledger_path.read_bytes()).hexdigest()
    for path in ("/", "/api/state", f"/e/{ids['crash']}", f"/api/log/{ids['crash']}", "/?tag=nope"):
        assert s.get(path).status_code == 200
    assert hashlib.sha256(lab.ledger_path.read_bytes()).hexdigest() == before
    reader = Ledger(lab.ledger_path, readonly=True)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader.db.execute("DELETE FROM experiments")
    reader.close()
    for method in ("post", "put", "delete"):
        assert getattr(requests, method)(s.url + "/api/state", timeout=10).status_code == 405


def test_loopback_answers_only_to_its_own_host_names(served: tuple[Served, dict[str, int]]) -> None:
    s, _ = served
    assert s.get("/", headers={"Host": f"localhost:{s.port}"}).status_code == 200
    # a page on another site that resolves its name to 127.0.0.1 (DNS rebinding) gets nothing
    r = s.get("/api/state", headers={"Host": "evil.example:8765"})
    assert r.status_code == 421 and "night" not in r.text


def test_a_non_loopback_dashboard_requires_its_token_on_every_request(lab: Lab) -> None:
    ids = fill(lab)
    s = Served(make_app(lab, token="s3cret-token", loopback=False))
    try:
        for path in ("/", "/api/state", f"/e/{ids['keep']}", "/api/events", "/static/app.js", f"/api/log/{ids['crash']}"):
            r = s.get(path)
            assert r.status_code == 401, path
            assert "night" not in r.text and "access token" in r.text
        assert s.get("/api/state", params={"token": "wrong"}).status_code == 401
        assert s.get("/api/state", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert s.get("/api/state", headers={"Cookie": "autoresearch_token=wrong"}).status_code == 401
        # the printed URL: a redirect that sets the cookie and takes the token out of the address
        r = s.get("/", params={"token": "s3cret-token", "tag": "night"})
        assert r.status_code == 303 and r.headers["location"] == "/?tag=night"
        assert "HttpOnly" in r.headers["set-cookie"] and "SameSite=Strict" in r.headers["set-cookie"]
        session = requests.Session()
        assert session.get(s.url + "/?token=s3cret-token", timeout=10).status_code == 200
        assert session.get(s.url + "/api/state", timeout=10).json()["tag"] == "night"
        assert s.get("/api/state", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
        # any Host is accepted there: the token is what protects it
        assert s.get("/api/state", headers={"Host": "10.0.0.5:8765", "Authorization": "Bearer s3cret-token"}).ok
    finally:
        s.stop()


@pytest.mark.parametrize("path", ["/static/../../.autoresearch/ledger.db", "/static/..%2f..%2f.autoresearch%2fledger.db",
                                  "/static/%2e%2e/%2e%2e/autoresearch.toml", "/e/..%2f..%2fetc%2fpasswd",
                                  "/static//etc/passwd", "/api/log/..%2f1", "/../../etc/passwd"])
def test_no_path_reaches_a_file_outside_the_package_and_the_ledger(served: tuple[Served, dict[str, int]],
                                                                  path: str) -> None:
    s, _ = served
    r = requests.get(s.url + path, timeout=10, allow_redirects=False)
    assert r.status_code in (400, 404), (path, r.status_code)
    assert "root:" not in r.text and "SQLite format" not in r.text and "[lab]" not in r.text


def test_recorded_paths_outside_the_lab_folders_are_not_read(lab: Lab, tmp_path: Path) -> None:
    """A ledger row is data: a log_path or transcript pointing elsewhere (or a link that does) is
    not shown."""
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET", encoding="utf-8")
    lab.logs.mkdir(parents=True)
    (lab.logs / "00009.log").symlink_to(secret)
    (lab.state_dir / "transcripts").mkdir()
    (lab.state_dir / "transcripts" / "x.txt").symlink_to(secret)
    with Ledger(lab.ledger_path) as ledger:
        common = dict(run_id=None, tag="t", agent="a", parent_commit="a" * 40, kind="experiment", status="crash")
        ids = [ledger.add(**common, description="abs", log_path=str(secret), meta={"transcript": str(secret)}),
               ledger.add(**common, description="dots", log_path=str(lab.logs / ".." / ".." / ".." / secret.name)),
               ledger.add(**common, description="link", log_path=str(lab.logs / "00009.log"),
                          meta={"transcript": str(lab.state_dir / "transcripts" / "x.txt")})]
    s = Served(make_app(lab))
    try:
        for eid in ids:
            assert "TOP SECRET" not in s.get(f"/e/{eid}").text
            log = s.get(f"/api/log/{eid}").json()
            assert log["text"] == "" and "not in the lab's logs folder" in log["missing"]
    finally:
        s.stop()


def test_a_huge_log_is_served_capped(lab: Lab) -> None:
    lab.logs.mkdir(parents=True)
    log = lab.logs / "00001.log"
    with log.open("w", encoding="utf-8") as f:
        for i in range(400_000):
            f.write(f"step {i:07d} loss 3.14159 \x1b[31mred\x1b[0m\n")
        f.write("the last line\n")
    with Ledger(lab.ledger_path) as ledger:
        eid = ledger.add(run_id=None, tag="t", agent="a", parent_commit="a" * 40, kind="experiment", status="crash",
                         description="loud", log_path=str(log))
    s = Served(make_app(lab))
    try:
        r = s.get(f"/api/log/{eid}")
        body = r.json()
        assert len(r.content) < 2 * data.LOG_TAIL_BYTES and body["truncated"] and body["size"] > 10 * 2**20
        assert body["text"].endswith("the last line\n") and "\x1b" not in body["text"]
        assert body["text"].startswith("step ")  # cut at a line
        page = s.get(f"/e/{eid}")
        assert len(page.content) < 4 * data.LOG_TAIL_BYTES and "the last line" in page.text
    finally:
        s.stop()


def test_events_announce_a_change_of_the_ledger(served: tuple[Served, dict[str, int]], lab: Lab) -> None:
    s, _ = served
    with requests.get(s.url + "/api/events", stream=True, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines(decode_unicode=True)
        assert next(lines) == "event: version"
        first = json.loads(next(lines).removeprefix("data: "))["version"]
        with Ledger(lab.ledger_path) as ledger:
            ledger.add(run_id=None, tag="night", agent="a", parent_commit="a" * 40, kind="experiment",
                       description="new", status="running")
        for line in lines:
            if line == "event: change":
                changed = json.loads(next(lines).removeprefix("data: "))["version"]
                assert changed != first
                break
    assert any(row["description"] == "new" for row in s.get("/api/state").json()["rows"])


def test_an_empty_lab_shows_a_page_that_waits_for_experiments(lab: Lab) -> None:
    s = Served(make_app(lab))
    try:
        assert "No experiments yet" in s.get("/").text
        assert s.get("/api/state").json()["empty"] is True
        fill(lab)  # the ledger appears while the server runs
        assert s.get("/api/state").json()["tag"] == "night"
    finally:
        s.stop()


def test_a_ledger_of_an_older_schema_is_refused_read_only(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
        db.execute("INSERT INTO _migrations VALUES ('m001_initial', 0)")
    with pytest.raises(LedgerError, match="older autoresearch") as info:
        Ledger(path, readonly=True)
    assert "autoresearch status" in (info.value.hint or "")
    with pytest.raises(LedgerError, match="no ledger"):
        Ledger(tmp_path / "none.db", readonly=True)


def test_script_json_cannot_close_its_element() -> None:
    text = str(script_json({"d": "</script><script>alert(1)</script> & <!--"}))
    assert "</" not in text and "<!--" not in text and "&" not in text
    assert json.loads(text) == {"d": "</script><script>alert(1)</script> & <!--"}


def test_the_html_report_is_one_file_with_hashed_scripts(lab: Lab) -> None:
    ids = fill(lab)
    with Ledger(lab.ledger_path) as ledger:
        history = ledger.experiments("night")
    html = render_html(lab, history, "night", [])
    assert "http://" not in html.split("<script>", 1)[0] and "<link" not in html.replace('<link rel="icon" href="data:,">', "")
    assert 'src="' not in html  # no script or image fetched from anywhere
    assert f'id="e-{ids["keep"]}"' in html and "Traceback: boom" in html
    policy = unescape(html.split('http-equiv="Content-Security-Policy" content="', 1)[1].split('"', 1)[0])
    assert "'sha256-" in policy and "unsafe-inline" not in policy


def test_report_html_from_the_cli(lab: Lab) -> None:
    fill(lab)
    proc = run_cli("report", "--html", "--tag", "night", cwd=lab.root)
    assert proc.returncode == 0, proc.stderr
    assert (lab.root / "report.html").is_file() and (lab.root / "report.md").is_file()
    assert "report.html" in proc.stdout


def test_dashboard_on_a_busy_port_is_a_one_line_error(lab: Lab) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_cli("dashboard", "--port", str(port), cwd=lab.root, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[0].startswith("error: the dashboard cannot listen on 127.0.0.1:")
    assert "--port" in proc.stderr


def test_the_state_can_carry_only_the_newest_rows(served: tuple[Served, dict[str, int]]) -> None:
    """`?rows=N`: what the first page fetches (the table's first page; the chart, figures and filter
    choices still of every row); anything but a number: all the rows."""
    s, _ = served
    full = s.get("/api/state").json()
    assert full["rows_total"] == len(full["rows"]) > 2
    head = s.get("/api/state?rows=2").json()
    assert head["rows"] == full["rows"][:2] and head["rows_total"] == full["rows_total"]
    assert head["chart"] == full["chart"] and head["counts"] == full["counts"] and head["facets"] == full["facets"]
    assert set(full["facets"]["status"]) == {r["status"] for r in full["rows"]}
    for odd in ("-1", "x", "1e9", "99999999999", ""):
        assert len(s.get(f"/api/state?rows={odd}").json()["rows"]) == full["rows_total"]
    assert s.get("/api/state?rows=0").json()["rows"] == []
