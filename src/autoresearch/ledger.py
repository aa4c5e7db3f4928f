"""The ledger: every experiment ever run, in SQLite (WAL). The source of truth.

Migrations are named functions applied in order on every open and recorded in `_migrations`,
so opening is safe to repeat and an old ledger is brought up to date. A row is written before
an experiment runs (status `running`) and completed after, so no experiment can disappear.
`results.tsv` (the original's five columns) is exported from here, never the other way round.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import AutoresearchError
from .experiment import Experiment, runs_of  # noqa: F401  (re-exported: `from .ledger import runs_of` keeps working)
from .files import write_atomically

STATUSES = ("pending", "running", "keep", "discard", "crash", "timeout", "invalid", "killed", "measured")
FINAL = ("keep", "discard", "crash", "timeout", "invalid", "killed", "measured")  # measured: a repeat run


class LedgerError(AutoresearchError):
    """The ledger file is unreadable, locked for too long, or from a newer autoresearch."""


def m001_initial(db: sqlite3.Connection) -> None:
    db.execute("""
        CREATE TABLE runs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            tag TEXT NOT NULL,
            agent TEXT NOT NULL,
            config_json TEXT NOT NULL,
            started_at REAL NOT NULL,
            stopped_at REAL,
            stop_reason TEXT
        )""")
    db.execute("""
        CREATE TABLE experiments (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id INTEGER REFERENCES runs(id),
            tag TEXT NOT NULL,
            kind TEXT NOT NULL DEFAULT 'experiment',
            parent_commit TEXT NOT NULL,
            commit_sha TEXT,
            agent TEXT NOT NULL,
            description TEXT NOT NULL,
            rationale TEXT,
            patch TEXT,
            status TEXT NOT NULL,
            reason TEXT,
            metric REAL,
            champion_metric REAL,
            summary_json TEXT,
            memory_gb REAL,
            propose_seconds REAL,
            run_seconds REAL,
            evaluate_seconds REAL,
            log_path TEXT,
            pid INTEGER,
            pgid INTEGER,
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL
        )""")
    db.execute("CREATE INDEX experiments_tag ON experiments(tag, id)")


def m002_lines_changed(db: sqlite3.Connection) -> None:
    db.execute("ALTER TABLE experiments ADD COLUMN lines_changed INTEGER")
    db.execute("ALTER TABLE experiments ADD COLUMN outcome TEXT")
    db.execute("ALTER TABLE experiments ADD COLUMN meta_json TEXT")


def m003_agents(db: sqlite3.Connection) -> None:
    """LLM agents: token usage and cost per experiment, repairs linked to the idea they fix, and the
    seconds the loop waited for a proposal (zero when it was prepared during the previous run)."""
    db.execute("ALTER TABLE experiments ADD COLUMN input_tokens INTEGER")
    db.execute("ALTER TABLE experiments ADD COLUMN output_tokens INTEGER")
    db.execute("ALTER TABLE experiments ADD COLUMN cost_usd REAL")
    db.execute("ALTER TABLE experiments ADD COLUMN repair_of INTEGER REFERENCES experiments(id)")
    db.execute("ALTER TABLE experiments ADD COLUMN wait_seconds REAL")


def m004_trust(db: sqlite3.Connection) -> None:
    """Noise-aware judging and trusted evaluation: repeated runs linked to what they repeat, the
    noise estimate at decision time, the held-out test metric of champions, the value the run printed
    (kept beside the trusted one), training seconds measured from outside, and the sandbox in force."""
    db.execute("ALTER TABLE experiments ADD COLUMN repeat_of INTEGER REFERENCES experiments(id)")
    db.execute("ALTER TABLE experiments ADD COLUMN sigma REAL")
    db.execute("ALTER TABLE experiments ADD COLUMN test_metric REAL")
    db.execute("ALTER TABLE experiments ADD COLUMN printed_metric REAL")
    db.execute("ALTER TABLE experiments ADD COLUMN handoff_seconds REAL")
    db.execute("ALTER TABLE experiments ADD COLUMN sandbox TEXT")


def m005_cpu(db: sqlite3.Connection) -> None:
    """The CPU seconds a run's process tree used: over its wall seconds, the cores it had, which
    drop when another job shares the machine."""
    db.execute("ALTER TABLE experiments ADD COLUMN cpu_seconds REAL")


def m006_eval_seconds(db: sqlite3.Connection) -> None:
    """How long the trusted evaluator took for a run's model (loading, checks and scoring), and how
    much of that the causality check took: what trust costs per experiment, on each device."""
    db.execute("ALTER TABLE experiments ADD COLUMN eval_seconds REAL")
    db.execute("ALTER TABLE experiments ADD COLUMN causal_seconds REAL")


def m007_workers(db: sqlite3.Connection) -> None:
    """Where a run ran when several run at once: the worker (`w0`, `w1`, ...), the node (`local` or a
    Ray node's address), the attempt (a run whose node died is run again under the same id), and the
    resources it had (`regime`: runs of one regime are comparable; the judge never mixes two)."""
    db.execute("ALTER TABLE experiments ADD COLUMN worker TEXT")
    db.execute("ALTER TABLE experiments ADD COLUMN node TEXT")
    db.execute("ALTER TABLE experiments ADD COLUMN attempt INTEGER")
    db.execute("ALTER TABLE experiments ADD COLUMN regime TEXT")


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [m001_initial, m002_lines_changed, m003_agents, m004_trust,
                                                          m005_cpu, m006_eval_seconds, m007_workers]


class Ledger:
    """An open ledger. One writer (the loop); readers (status, report, dashboard) may share it."""

    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path, self.readonly = path, readonly
        self._lock = threading.RLock()
        # The rows read since the last write are reused (a run's workers read the tag's rows many
        # times per claim): this connection's writes bump _version, another connection's change
        # SQLite's `PRAGMA data_version`.
        self._version = 0
        self._cache: dict[str | None, tuple[int, list[Experiment]]] = {}
        if readonly:
            self._open_readonly()
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # one connection shared by the orchestrator's threads (its workers), every use under _lock
            self.db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
            self.db.row_factory = sqlite3.Row
            self._journal_wal()
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"cannot open the ledger {path}: {exc}",
                              "move the file aside to start a new ledger; the git refs keep every experiment") from None

    def _open_readonly(self) -> None:
        """A reader that can never write (the dashboard): SQLite's `mode=ro`, no migration. A ledger
        without every migration is refused, since its rows would not fit `Experiment`."""
        if not self.path.is_file():
            raise LedgerError(f"no ledger at {self.path}", "start experiments with `autoresearch run`")
        try:
            self.db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=30,
                                      isolation_level=None, check_same_thread=False)
            self.db.row_factory = sqlite3.Row
            done = {row[0] for row in self.db.execute("SELECT name FROM _migrations")}
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"cannot read the ledger {self.path}: {exc}",
                              "check the file; `autoresearch status` says more") from None
        known = self._known(done)
        if known - done:
            raise LedgerError(f"the ledger {self.path} is from an older autoresearch",
                              "run `autoresearch status` once in the lab to bring it up to date")

    def _known(self, done: set[str]) -> set[str]:
        """The migrations this autoresearch knows; a ledger with one it does not is refused."""
        known = {m.__name__ for m in MIGRATIONS}
        if done - known:
            raise LedgerError(f"the ledger {self.path} was written by a newer autoresearch ({sorted(done - known)[-1]})",
                              "upgrade autoresearch")
        return known

    def data_version(self) -> int:
        """A number that changes whenever another connection commits (SQLite's `PRAGMA data_version`),
        plus this connection's own writes: readers poll it to see that the ledger changed."""
        with self._lock:
            return self._version + int(self.db.execute("PRAGMA data_version").fetchone()[0])

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            self._version += 1
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self.db.execute(sql, args))

    def _journal_wal(self) -> None:
        """Switch to WAL. The switch takes the database exclusively and does not wait on the busy
        timeout, so a second process opening the ledger at the same moment retries it."""
        deadline = time.monotonic() + 30
        while True:
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _migrate(self) -> None:
        """Apply the migrations this ledger lacks. Each one is checked and applied in one write
        transaction, so two processes opening a new ledger at once never apply one twice."""
        with self.transaction() as db:
            db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
            done = {row[0] for row in db.execute("SELECT name FROM _migrations")}
        self._known(done)
        for migration in MIGRATIONS:
            if migration.__name__ in done:
                continue
            with self.transaction() as db:
                if db.execute("SELECT 1 FROM _migrations WHERE name = ?", (migration.__name__,)).fetchone():
                    continue  # another process applied it meanwhile
                migration(db)
                db.execute("INSERT INTO _migrations VALUES (?, ?)", (migration.__name__, time.time()))

    @property
    def schema_version(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM _migrations").fetchone()[0])

    # -- runs -------------------------------------------------------------------------------

    def start_run(self, tag: str, agent: str, config: dict[str, Any]) -> int:
        with self.transaction() as db:
            cur = db.execute("INSERT INTO runs (tag, agent, config_json, started_at) VALUES (?, ?, ?, ?)",
                             (tag, agent, json.dumps(config, sort_keys=True, default=str), time.time()))
        return int(cur.lastrowid or 0)

    def stop_run(self, run_id: int, reason: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE runs SET stopped_at = ?, stop_reason = ? WHERE id = ?", (time.time(), reason, run_id))

    def runs(self, tag: str | None = None) -> list[sqlite3.Row]:
        if tag is None:
            return self._rows("SELECT * FROM runs ORDER BY id")
        return self._rows("SELECT * FROM runs WHERE tag = ? ORDER BY id", (tag,))

    # -- experiments ------------------------------------------------------------------------

    def add(self, *, run_id: int | None, tag: str, kind: str, parent_commit: str, agent: str,
            description: str, status: str = "pending", **fields: Any) -> int:
        """Insert an experiment and return its id."""
        assert status in STATUSES, status
        if "meta" in fields:
            fields["meta_json"] = json.dumps(fields.pop("meta"), sort_keys=True, default=str)
        row = dict(run_id=run_id, tag=tag, kind=kind, parent_commit=parent_commit, agent=agent,
                   description=description, status=status, created_at=time.time(), **fields)
        names = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self.transaction() as db:
            cur = db.execute(f"INSERT INTO experiments ({names}) VALUES ({marks})", tuple(row.values()))
        return int(cur.lastrowid or 0)

    def update(self, experiment_id: int, **fields: Any) -> None:
        """Set columns of one experiment (summary= takes a dict and is stored as JSON)."""
        for name in ("summary", "meta"):
            if name in fields:
                fields[f"{name}_json"] = json.dumps(fields.pop(name), sort_keys=True, default=str)
        if "status" in fields:
            assert fields["status"] in STATUSES, fields["status"]
        if not fields:
            return
        sets = ", ".join(f"{name} = ?" for name in fields)
        with self.transaction() as db:
            db.execute(f"UPDATE experiments SET {sets} WHERE id = ?", (*fields.values(), experiment_id))

    def get(self, experiment_id: int) -> Experiment:
        rows = self._rows("SELECT * FROM experiments WHERE id = ?", (experiment_id,))
        row = rows[0] if rows else None
        if row is None:
            raise LedgerError(f"no experiment {experiment_id} in the ledger")
        return Experiment(**dict(row))

    def experiments(self, tag: str | None = None) -> list[Experiment]:
        with self._lock:
            version = self.data_version()
            cached = self._cache.get(tag)
            if cached is None or cached[0] != version:
                sql, args = "SELECT * FROM experiments", tuple[str, ...]()
                if tag is not None:
                    sql, args = sql + " WHERE tag = ?", (tag,)
                cached = version, [Experiment(**dict(row)) for row in self._rows(sql + " ORDER BY id", args)]
                self._cache[tag] = cached
            return list(cached[1])

    def unfinished(self, tag: str) -> list[Experiment]:
        """Experiments a killed orchestrator left `pending` or `running`."""
        return [e for e in self.experiments(tag) if e.status in ("pending", "running")]

    def tags(self) -> list[str]:
        return [row[0] for row in self._rows("SELECT DISTINCT tag FROM experiments ORDER BY tag")]

    # -- export -----------------------------------------------------------------------------

    def export_tsv(self, path: Path, tag: str | None = None) -> None:
        """Write results.tsv in the original's format: commit, val_bpb, memory_gb, status, description.

        Crashes get 0.000000 and 0.0 as in the original; unfinished rows are left out. Written to a
        temporary file and renamed, so a reader never sees half a file.
        """
        lines = ["commit\tval_bpb\tmemory_gb\tstatus\tdescription"]
        for e in self.experiments(tag):
            if e.status not in FINAL or e.kind == "repeat":  # repeats are measurements, not experiments
                continue
            metric = e.metric if e.metric is not None and e.status in ("keep", "discard") else 0.0
            memory = e.memory_gb if e.memory_gb is not None and e.status in ("keep", "discard") else 0.0
            status = e.status if e.status in ("keep", "discard") else "crash"
            description = " ".join(e.description.split()).replace("\t", " ")
            lines.append(f"{e.short_commit}\t{metric:.6f}\t{memory:.1f}\t{status}\t{description}")
        write_atomically(path, "\n".join(lines) + "\n")
