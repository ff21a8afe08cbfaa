"""The study's SQLite store: one file per study, every result kept exactly once.

Tables:

    study   one row: name, spec (JSON of the parsed YAML), created
    runs    one row per run: id, dataset, method, seed, status, error, config,
            host, device, started, finished, attempts, and what made its result
            (PROVENANCE_COLUMNS: the code's version, commit, dirty flag and source
            hash; torch, the device's model, dtype, threads, compile, replicas; and
            whether every attempt of the run had the same; see gradnoise.lm.training.provenance)
    curves  every logged point: PRIMARY KEY (run_id, kind, step)
    finals  one row per finished run: the trainer's result["finals"]

A store written by an older gradnoise gets the run, curve and finals columns added
since (ALTER TABLE ... ADD COLUMN) when the driver opens it; its rows read NULL there
(a reader opening it read-only sees NULL for the missing columns), and `run_code` calls
their code unknown.

Only the study's driver process writes. A run's curves and finals are written
in one transaction together with its status change, so a kill at any moment
leaves either nothing or everything of that run. WAL mode lets readers
(`gradnoise study status`, the report) look while the driver writes.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

from gradnoise.errors import UserError
from gradnoise.lm.storage import runlog

#: The store's file in a study directory.
STORE_FILE = "study.sqlite"
STATUSES = ("pending", "running", "done", "failed", "diverged")
FINISHED = runlog.FINISHED
TRAIN_METRICS = runlog.TRAIN_FIELDS
EVAL_METRICS = runlog.EVAL_FIELDS
CURVE_KINDS = runlog.KINDS
#: Logged by the MNIST task's evals beside the losses (higher is better).
ACCURACY_METRICS = ("test_acc",)
CURVE_COLUMNS = ("run_id", "kind", "step", "time_s", *TRAIN_METRICS, *EVAL_METRICS, *ACCURACY_METRICS)
FINAL_METRICS = runlog.FINAL_METRICS

_INTEGER_FINALS = {"steps": "INTEGER", "best_val_step": "INTEGER", "parameters": "INTEGER"}
#: What made a run's result (its result.json's "provenance"): column → (section, key, type).
PROVENANCE_COLUMNS = {
    "code_version": ("code", "version", "TEXT"),
    "code_commit": ("code", "commit", "TEXT"),
    "code_dirty": ("code", "dirty", "INTEGER"),
    "code_sha256": ("code", "source_sha256", "TEXT"),
    "torch_version": ("numerics", "torch", "TEXT"),
    "device_model": ("numerics", "device_model", "TEXT"),
    "dtype": ("numerics", "dtype", "TEXT"),
    "threads": ("numerics", "threads", "INTEGER"),
    "compiled": ("numerics", "compile", "INTEGER"),
    "replicas": ("numerics", "replicas", "INTEGER"),
    "provenance_consistent": (None, "consistent", "INTEGER"),
}
#: Per table, the value columns that may be newer than a store (added when it is opened).
_VALUE_COLUMNS = {
    "runs": {name: sql_type for name, (_, _, sql_type) in PROVENANCE_COLUMNS.items()},
    "curves": {m: "REAL" for m in (*TRAIN_METRICS, *EVAL_METRICS, *ACCURACY_METRICS)},
    "finals": {m: _INTEGER_FINALS.get(m, "REAL") for m in FINAL_METRICS},
}

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS study (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    dataset TEXT NOT NULL,
    method TEXT NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN {STATUSES}),
    error TEXT,
    config TEXT NOT NULL,
    host TEXT,
    device TEXT,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    {", ".join(f"{m} {t}" for m, t in _VALUE_COLUMNS["runs"].items())}
);
CREATE TABLE IF NOT EXISTS curves (
    run_id TEXT NOT NULL REFERENCES runs(id),
    kind TEXT NOT NULL CHECK (kind IN {CURVE_KINDS}),
    step INTEGER NOT NULL,
    time_s REAL,
    {", ".join(f"{m} {t}" for m, t in _VALUE_COLUMNS["curves"].items())},
    PRIMARY KEY (run_id, kind, step)
);
CREATE TABLE IF NOT EXISTS finals (
    run_id TEXT PRIMARY KEY REFERENCES runs(id),
    {", ".join(f"{m} {t}" for m, t in _VALUE_COLUMNS["finals"].items())},
    extra TEXT NOT NULL DEFAULT '{{}}'
);
"""

_PROVENANCE_SET = ", ".join(f"{column} = ?" for column in PROVENANCE_COLUMNS)
_RUN_COLUMNS = (
    "id",
    "dataset",
    "method",
    "seed",
    "status",
    "error",
    "config",
    "host",
    "device",
    "started",
    "finished",
    "attempts",
    *PROVENANCE_COLUMNS,
)


class Store:
    """The SQLite file of one study. Readers use `study`, `runs`, `finals`, `curves`;
    the driver alone uses the writer methods below them."""

    def __init__(self, path: Path, *, readonly: bool = False):
        """Open (and, for the driver, create or migrate) a study's store.

        readonly: for readers (`study status`, the report): nothing is written, not
            even the schema; columns an older store lacks read as NULL.
        """
        self.path = Path(path)
        self._readonly = readonly
        try:
            if readonly:
                self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=60.0)
            else:
                # isolation_level=None: no implicit transactions; writers say BEGIN themselves.
                self._db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        except sqlite3.Error as error:
            raise UserError(f"cannot open the study store {self.path}: {error}") from None
        try:
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA busy_timeout = 60000")
            if not readonly:
                self._db.execute("PRAGMA journal_mode = WAL")
                self._db.execute("PRAGMA synchronous = NORMAL")  # durable at each WAL checkpoint
                self._db.execute("PRAGMA foreign_keys = ON")
                with self._transaction():  # under the write lock: two openers never both migrate
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            self._db.execute(statement)
                    self._add_missing_columns()
            self._columns = {
                table: {row["name"] for row in self._db.execute(f"PRAGMA table_info({table})")}
                for table in ("study", "runs", "curves", "finals")
            }
        except sqlite3.DatabaseError as error:  # "file is not a database", a damaged one
            self._db.close()
            raise UserError(f"cannot open the study store {self.path}: {error}") from None
        if not self._columns["study"]:
            self._db.close()
            raise UserError(f"{self.path} holds no study (no study table)")

    def _select(self, table: str, alias: str, columns) -> str:
        """`alias.column` for each column, NULL for one this (older, read-only) store lacks."""
        present = self._columns[table]
        return ", ".join(f"{alias}.{c}" if c in present else f"NULL AS {c}" for c in columns)

    def close(self) -> None:
        if not self._readonly:
            # Leave a rollback-journal file behind: a read-only opener of a WAL database
            # creates -wal and -shm files beside it, which a finished study should not
            # get from `study status` or `study report`. Busy (a reader still has it
            # open): stay in WAL, the next writer's close converts it.
            try:
                self._db.execute("PRAGMA busy_timeout = 0")
                self._db.execute("PRAGMA journal_mode = DELETE")
            except sqlite3.OperationalError:
                pass
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- readers ----------------------------------------------------------

    def study(self) -> dict:
        """{"name", "spec" (the parsed YAML), "created"}; UserError if the file holds no study."""
        row = self._db.execute("SELECT name, spec, created FROM study WHERE id = 1").fetchone()
        if row is None:
            raise UserError(f"{self.path} holds no study (no study row)")
        return {"name": row["name"], "spec": json.loads(row["spec"]), "created": row["created"]}

    def runs(self) -> list[dict]:
        """Every run in insertion order, its config decoded."""
        rows = self._db.execute(
            f"SELECT {self._select('runs', 'r', _RUN_COLUMNS)} FROM runs r ORDER BY rowid"
        )
        return [{**dict(row), "config": json.loads(row["config"])} for row in rows]

    def run(self, run_id: str) -> dict:
        """One run, as in `runs()`."""
        row = self._db.execute(
            f"SELECT {self._select('runs', 'r', _RUN_COLUMNS)} FROM runs r WHERE id = ?", (run_id,)
        ).fetchone()
        if row is None:
            raise KeyError(run_id)
        return {**dict(row), "config": json.loads(row["config"])}

    def finals(self) -> list[dict]:
        """One dict per run with finals: id, dataset, method, seed, status + every final metric."""
        rows = self._db.execute(
            f"SELECT r.id, r.dataset, r.method, r.seed, r.status, "
            f"{self._select('finals', 'f', FINAL_METRICS)}, f.extra "
            "FROM finals f JOIN runs r ON r.id = f.run_id ORDER BY r.rowid"
        )
        out = []
        for row in rows:
            record = dict(row)
            extra = json.loads(record.pop("extra"))
            out.append({**record, **extra})
        return out

    def curves(self, run_ids: list[str] | None = None) -> list[dict]:
        """Logged points ordered by run, kind, step; all runs unless `run_ids` is given."""
        query = f"SELECT {self._select('curves', 'c', CURVE_COLUMNS)} FROM curves c"
        params: tuple = ()
        if run_ids is not None:
            query += f" WHERE run_id IN ({', '.join('?' * len(run_ids))})"
            params = tuple(run_ids)
        query += " ORDER BY run_id, kind, step"
        return [dict(row) for row in self._db.execute(query, params)]

    def counts(self) -> dict[str, int]:
        """Number of runs per status (every status present, 0 where none)."""
        counts = dict.fromkeys(STATUSES, 0)
        for status, n in self._db.execute("SELECT status, COUNT(*) FROM runs GROUP BY status"):
            counts[status] = n
        return counts

    # ---- writer (the driver process only) ---------------------------------

    def create_study(self, name: str, spec: dict) -> None:
        """Record the study once; UserError if this store already holds a different one."""
        with self._transaction():
            row = self._db.execute("SELECT name, spec FROM study WHERE id = 1").fetchone()
            if row is None:
                self._db.execute(
                    "INSERT INTO study (id, name, spec, created) VALUES (1, ?, ?, ?)",
                    (name, _canonical_json(spec), time.time()),
                )
                return
        if row["name"] != name or json.loads(row["spec"]) != json.loads(_canonical_json(spec)):
            raise UserError(
                f"{self.path} already holds study {row['name']!r} with a different spec; "
                "choose another --dir, or run the spec it holds (DIR/spec.yaml)"
            )

    def replace_spec(self, spec: dict) -> None:
        """Store a new version of the study's spec. The caller checks that it expands to the
        same runs (only what the report reads may change: see `spec.REPORT_KEYS`)."""
        with self._transaction():
            if (
                self._db.execute("UPDATE study SET spec = ? WHERE id = 1", (_canonical_json(spec),)).rowcount
                != 1
            ):
                raise UserError(f"{self.path} holds no study (no study row)")

    def add_runs(self, runs: Iterable[tuple[str, str, str, int, dict]]) -> None:
        """Insert (id, dataset, method, seed, config) as pending; ids already present are kept."""
        with self._transaction():
            self._db.executemany(
                "INSERT OR IGNORE INTO runs (id, dataset, method, seed, status, config) "
                "VALUES (?, ?, ?, ?, 'pending', ?)",
                [(i, d, m, s, _canonical_json(c)) for i, d, m, s, c in runs],
            )

    def mark_running(self, run_id: str, host: str, device: str) -> None:
        """A new attempt starts: status running, attempts + 1."""
        with self._transaction():
            self._update_one(
                "UPDATE runs SET status = 'running', host = ?, device = ?, started = ?, "
                "finished = NULL, error = NULL, attempts = attempts + 1 WHERE id = ?",
                (host, device, time.time(), run_id),
            )

    def mark_pending(self, run_ids: Iterable[str]) -> None:
        """Runs whose attempt was interrupted cleanly: they resume on the next `run`."""
        with self._transaction():
            self._db.executemany(
                "UPDATE runs SET status = 'pending' WHERE id = ? AND status = 'running'",
                [(i,) for i in run_ids],
            )

    def record_result(self, run_id: str, result: dict, curves: Iterable[dict]) -> None:
        """Status, finals and curves of a finished run (result as the trainer's result.json),
        in one transaction. Curve points already stored are replaced, never duplicated."""
        status = result.get("status")
        if status not in FINISHED:
            raise ValueError(f"result status must be one of {FINISHED}, got {status!r}")
        finals = dict(result.get("finals") or {})
        extra = {k: v for k, v in finals.items() if k not in FINAL_METRICS}
        points = [_curve_row(run_id, point) for point in curves if point.get("kind") in CURVE_KINDS]
        made_by = _provenance_values(result.get("provenance"))
        with self._transaction():
            self._update_one(
                "UPDATE runs SET status = ?, error = ?, host = COALESCE(?, host), "
                f"device = COALESCE(?, device), finished = ?, {_PROVENANCE_SET} "
                "WHERE id = ?",
                (
                    status,
                    result.get("error"),
                    result.get("host"),
                    result.get("device"),
                    time.time(),
                    *made_by,
                    run_id,
                ),
            )
            self._db.execute(
                f"INSERT OR REPLACE INTO finals (run_id, {', '.join(FINAL_METRICS)}, extra) "
                f"VALUES (?, {', '.join('?' * len(FINAL_METRICS))}, ?)",
                (run_id, *(finals.get(m) for m in FINAL_METRICS), _canonical_json(extra)),
            )
            self._db.executemany(
                f"INSERT OR REPLACE INTO curves ({', '.join(CURVE_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(CURVE_COLUMNS))})",
                points,
            )

    def record_failure(self, run_id: str, error: str) -> None:
        """The attempt failed (crash, bad input at run time): status failed, with its error."""
        with self._transaction():
            self._update_one(
                "UPDATE runs SET status = 'failed', error = ?, finished = ? WHERE id = ?",
                (error, time.time(), run_id),
            )

    # ---- helpers ----------------------------------------------------------

    def _add_missing_columns(self) -> None:
        """Columns added to runlog's fields since this store was written; NULL in old rows."""
        for table, columns in _VALUE_COLUMNS.items():
            present = {row["name"] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for name, sql_type in columns.items():
                if name not in present:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}")

    def _transaction(self):
        return _Transaction(self._db)

    def _update_one(self, sql: str, params: tuple) -> None:
        if self._db.execute(sql, params).rowcount != 1:
            raise KeyError(f"no run {params[-1]!r} in {self.path}")


class _Transaction:
    """BEGIN IMMEDIATE … COMMIT, or ROLLBACK if the block raises."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb):
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


def _provenance_values(made_by) -> tuple:
    """PROVENANCE_COLUMNS' values from a result's "provenance" (all None without one)."""
    made_by = made_by if isinstance(made_by, dict) else {}
    values = []
    for section, key, sql_type in PROVENANCE_COLUMNS.values():
        part = made_by.get(section) if section else made_by
        value = part.get(key) if isinstance(part, dict) else None
        values.append(int(value) if sql_type == "INTEGER" and isinstance(value, bool) else value)
    return tuple(values)


def run_code(row: dict) -> dict | None:
    """A run row's code identity as gradnoise.lm.training.provenance writes it; None: unknown (a
    run recorded before runs recorded it, or not finished)."""
    if not row.get("code_sha256"):
        return None
    dirty = row.get("code_dirty")
    return {
        "version": row.get("code_version"),
        "commit": row.get("code_commit"),
        "dirty": None if dirty is None else bool(dirty),
        "source_sha256": row["code_sha256"],
    }


def run_numerics(row: dict) -> dict | None:
    """A run row's numerics (gradnoise.lm.training.provenance.numerics, the device's name aside);
    None where unknown."""
    if row.get("torch_version") is None:
        return None
    compiled = row.get("compiled")
    return {
        "torch": row["torch_version"],
        "device_model": row.get("device_model"),
        "dtype": row.get("dtype"),
        "threads": row.get("threads"),
        "compile": None if compiled is None else bool(compiled),
        "replicas": row.get("replicas"),
    }


def _canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _curve_row(run_id: str, point: dict) -> tuple:
    return (run_id, point["kind"], int(point["step"]), *(point.get(c) for c in CURVE_COLUMNS[3:]))
