"""The ledger: migrations from blank and from the first schema, WAL, results.tsv export."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from autoresearch.ledger import MIGRATIONS, Ledger, LedgerError, m001_initial


def test_blank_ledger_gets_every_migration(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as ledger:
        assert ledger.schema_version == len(MIGRATIONS)
        assert ledger.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with Ledger(tmp_path / "l.db") as ledger:  # opening again applies nothing twice
        assert ledger.schema_version == len(MIGRATIONS)
        names = [r[0] for r in ledger.db.execute("SELECT name FROM _migrations ORDER BY rowid")]
        assert names == [m.__name__ for m in MIGRATIONS]


def test_upgrade_from_the_first_schema_keeps_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    m001_initial(db)
    db.execute("INSERT INTO _migrations VALUES ('m001_initial', 0)")
    db.execute("INSERT INTO experiments (tag, kind, parent_commit, agent, description, status, created_at) "
               "VALUES ('t', 'baseline', 'abc', 'hparam', 'baseline', 'keep', ?)", (time.time(),))
    db.commit()
    db.close()
    with Ledger(path) as ledger:
        assert ledger.schema_version == len(MIGRATIONS)
        (e,) = ledger.experiments("t")
        assert e.description == "baseline" and e.lines_changed is None and e.meta == {}


def test_newer_ledger_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    Ledger(path).close()
    db = sqlite3.connect(path)
    db.execute("INSERT INTO _migrations VALUES ('m999_future', 0)")
    db.commit()
    db.close()
    with pytest.raises(LedgerError, match="newer autoresearch"):
        Ledger(path)


def test_corrupt_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerError, match="cannot open the ledger"):
        Ledger(path)


def test_rows_and_tsv_export(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as ledger:
        run = ledger.start_run("t", "hparam", {"budget": 5})
        a = ledger.add(run_id=run, tag="t", kind="baseline", parent_commit="a" * 40, commit_sha="a" * 40,
                       agent="hparam", description="baseline", status="running")
        ledger.update(a, status="keep", metric=1.25, memory_gb=0.5, summary={"val_bpb": 1.25}, finished_at=time.time())
        b = ledger.add(run_id=run, tag="t", kind="experiment", parent_commit="a" * 40, commit_sha="b" * 40,
                       agent="hparam", description="LR 0.1\t-> 0.2", status="running", meta={"params": {"LR": 0.2}})
        ledger.update(b, status="timeout", reason="too slow")
        ledger.add(run_id=run, tag="t", kind="experiment", parent_commit="a" * 40, agent="hparam",
                   description="still running", status="running")
        ledger.stop_run(run, "done")
        assert [e.id for e in ledger.unfinished("t")] == [3]
        assert ledger.get(b).meta == {"params": {"LR": 0.2}}
        assert ledger.get(a).summary == {"val_bpb": 1.25}
        ledger.export_tsv(tmp_path / "results.tsv", "t")
        assert ledger.runs("t")[0]["stop_reason"] == "done"
    lines = (tmp_path / "results.tsv").read_text().splitlines()
    assert lines == ["commit\tval_bpb\tmemory_gb\tstatus\tdescription",
                     "aaaaaaa\t1.250000\t0.5\tkeep\tbaseline",
                     "bbbbbbb\t0.000000\t0.0\tcrash\tLR 0.1 -> 0.2"]


def test_rows_are_reused_until_anyone_writes(tmp_path: Path) -> None:
    """experiments() reuses the rows it read until this connection or another one writes."""
    path = tmp_path / "ledger.db"
    with Ledger(path) as writer, Ledger(path) as reader:
        writer.add(run_id=None, tag="t", kind="baseline", parent_commit="abc", agent="a", description="one")
        first = reader.experiments("t")
        assert reader.experiments("t") == first and reader.experiments("t") is not first  # a copy each time
        writer.add(run_id=None, tag="t", kind="experiment", parent_commit="abc", agent="a", description="two")
        assert [e.description for e in reader.experiments("t")] == ["one", "two"]  # another connection's write
        reader.update(first[0].id, description="changed", meta={"k": 1})
        assert reader.experiments("t")[0].description == "changed"  # its own write
        assert writer.experiments("t")[0].meta == {"k": 1}
        writer.experiments("t")[0].meta["k"] = 2  # meta is parsed once and handed out as a copy
        assert writer.experiments("t")[0].meta == {"k": 1}
