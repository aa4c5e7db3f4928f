"""How fast the dashboard is on a big ledger: the first page and a live update, in a real browser.

    python bench/bench_dashboard.py [--experiments 10000] [--updates 10] [--screenshot docs/dashboard.png]

Makes a lab whose ledger holds N synthetic experiments (a night of a few agents on 4 workers: kept,
discarded, crashed and repeat runs, with diffs and noise), serves the dashboard on 127.0.0.1, and
drives Debian's chromium through Selenium:
- first page: navigation start to the chart and the table drawn, as the page itself measures it
  (`data-drawn`, from `performance.now()`; Selenium's round trips are not in it), and the server's
  time for `/`, for `/api/state?rows=200` (what the first page fetches) and for all the rows;
- live update: a row written to the ledger by another connection until the browser shows it in the
  table (measured in the browser against the write's wall time), `--updates` times.
Goals (issue 15): first page < 300 ms, live update < 2 s.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from autoresearch.lab import init_lab  # noqa: E402
from autoresearch.ledger import Ledger  # noqa: E402

AGENTS = ["hparam", "openai:qwen2.5-coder-7b", "claude-code"]
IDEAS = ["raise the learning rate to {x:.4f}", "warmup ratio {x:.2f}", "depth 6 → 8 with a narrower MLP",
         "weight decay {x:.3f} on the embeddings", "replace GELU by ReLU² in the MLP", "value embeddings every {n} layers",
         "batch size 2^{n} tokens", "muon momentum {x:.2f}", "tie the embedding and the head", "RoPE base {n}0000"]


def synthetic_patch(rng: random.Random, i: int) -> str:
    old, new = rng.uniform(0.001, 0.05), rng.uniform(0.001, 0.05)
    return (f"diff --git a/train.py b/train.py\n--- a/train.py\n+++ b/train.py\n@@ -{10 + i % 50},3 +{10 + i % 50},3 @@\n"
            f" DEPTH = 8  # number of layers\n-LR = {old:.5f}\n+LR = {new:.5f}\n WARMUP = 0.1\n")


def make_ledger(path: Path, n: int, seed: int = 0) -> int:
    """Fill the ledger at `path` with `n` experiments of tag `night` (plus repeats); returns the run id."""
    rng = random.Random(seed)
    t0 = time.time() - n * 60
    with Ledger(path) as ledger:
        run = ledger.start_run("night", "hparam", {"budget": 300, "startup_allowance": 60, "eval_allowance": 120,
                                                    "workers": [{"name": f"w{i}", "node": "local", "runs_on": f"cuda:{i}"}
                                                                for i in range(4)]})
        champion, sigma = 1.0, None
        rows = []
        for i in range(n):
            kind = "baseline" if i == 0 else "experiment"
            metric = champion + rng.gauss(0.004, 0.006)
            status = "keep" if i == 0 or metric < champion - 0.008 else "discard"
            outcome = "ok"
            if i and rng.random() < 0.06:
                status, metric, outcome = rng.choice(["crash", "invalid", "timeout"]), None, "crash"
            if i >= 4:
                sigma = 0.003
            rows.append(dict(run_id=run, tag="night", kind=kind, parent_commit=f"{i:040x}", commit_sha=f"{i + 1:040x}",
                             agent=AGENTS[i % len(AGENTS)], description=rng.choice(IDEAS).format(x=rng.random(), n=i % 9 + 1),
                             rationale="Because the loss curve flattens early.", patch=synthetic_patch(rng, i),
                             status=status, outcome=outcome, metric=metric,
                             champion_metric=None if i == 0 else champion, sigma=sigma, run_seconds=300 + rng.random(),
                             created_at=t0 + i * 60, started_at=t0 + i * 60, finished_at=t0 + i * 60 + 300,
                             worker=f"w{i % 4}", node="local", regime="cuda", lines_changed=2, reason="judged"))
            if status == "keep" and metric is not None:
                champion = metric
        with ledger.transaction() as db:
            names = list(rows[0])
            db.executemany(f"INSERT INTO experiments ({', '.join(names)}) VALUES ({', '.join('?' for _ in names)})",
                           [tuple(r[k] for k in names) for r in rows])
        return run


def browser():  # type: ignore[no-untyped-def]
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", type=int, default=10_000)
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--screenshot", default=None, help="save a PNG of the overview here")
    args = parser.parse_args()

    import requests
    import uvicorn

    from autoresearch.web.server import make_app

    with tempfile.TemporaryDirectory() as tmp:
        lab = init_lab(Path(tmp) / "lab", dataset="sotu", preset="cpu")
        t = time.perf_counter()
        run = make_ledger(lab.ledger_path, args.experiments)
        print(f"ledger: {args.experiments} experiments written in {time.perf_counter() - t:.1f} s")
        server = uvicorn.Server(uvicorn.Config(make_app(lab), host="127.0.0.1", port=0, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}/"
        cold = time.perf_counter()
        requests.get(url + "api/state", timeout=60)
        print(f"server, first /api/state after start (state computed): {1000 * (time.perf_counter() - cold):.0f} ms")
        for name in ("", "api/state?rows=200", "api/state"):
            times = []
            for _ in range(5):
                t = time.perf_counter()
                r = requests.get(url + name, timeout=60)
                times.append(1000 * (time.perf_counter() - t))
            print(f"server, /{name} (cached state): median {statistics.median(times):.0f} ms, {len(r.content) / 1024:.0f} KiB")
        driver = browser()
        try:
            loads = []
            for _ in range(5):
                driver.get(url)
                while (drawn := driver.execute_script("return document.body.dataset.drawn")) is None:
                    time.sleep(0.01)
                loads.append(float(drawn))
            print(f"browser, first page to chart and table drawn: median {statistics.median(loads):.0f} ms "
                  f"(runs {', '.join(f'{x:.0f}' for x in loads)}); goal < 300 ms")
            if args.screenshot:
                time.sleep(0.5)
                Path(args.screenshot).parent.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(args.screenshot)
                print(f"screenshot: {args.screenshot}")
            lags = []
            with Ledger(lab.ledger_path) as ledger:
                for i in range(args.updates):
                    before = int(driver.execute_script("return document.body.dataset.rows"))
                    written = time.time()
                    ledger.add(run_id=run, tag="night", kind="experiment", parent_commit="0" * 40, agent="hparam",
                               description=f"live update {i}", status="running", started_at=written, worker="w0")
                    while int(driver.execute_script("return document.body.dataset.rows")) == before:
                        time.sleep(0.005)
                    lags.append(time.time() - written)
                    time.sleep(0.3)
            print(f"browser, ledger write to the row shown: median {1000 * statistics.median(lags):.0f} ms, "
                  f"max {1000 * max(lags):.0f} ms over {len(lags)}; goal < 2000 ms")
        finally:
            driver.quit()
            server.should_exit = True


if __name__ == "__main__":
    main()
