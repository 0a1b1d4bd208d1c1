"""Adaptation jobs and their durable log: a table in the sample store's SQLite file (WAL).

Every state change of a job (queued, running, accepted, rejected, failed, rolled back) is committed
before it is reported, with ``synchronous=FULL``, so ``GetAdaptation``/``ListAdaptations`` answer
the same after a restart. A job still QUEUED or RUNNING when its process died is marked FAILED at
the next start, with the reason; it is not re-run (its target slots may have changed since).
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS adaptation_jobs (
    number INTEGER PRIMARY KEY,   -- job-<number>
    state TEXT NOT NULL,
    job TEXT NOT NULL             -- the Job as JSON
);
"""
FINAL_STATES = ("ACCEPTED", "REJECTED", "FAILED")


@dataclass
class Job:
    job_id: str
    context: str
    slot_ids: list[str]
    method: str
    scope: str = "global"  # the context the new version serves, or "global"
    state: str = "QUEUED"  # QUEUED RUNNING ACCEPTED REJECTED FAILED
    progress: float = 0.0
    stage: str = ""  # what the job is doing now (progress bars show it)
    ber_before: float = 0.0
    ber_after: float = 0.0
    regression_ber_before: float = 0.0
    regression_ber_after: float = 0.0
    new_version: str = ""
    parent_version: str = ""
    parent_scoped: bool = False  # the parent was the context's own scoped version (rollback restores it)
    message: str = ""
    selected_summary: str = ""
    rolled_back: bool = False
    stage_seconds: dict[str, float] = field(default_factory=dict)
    options: dict[str, str] = field(default_factory=dict)
    created: float = field(default_factory=time.time)

    @property
    def number(self) -> int:
        return int(self.job_id.split("-")[1])

    @staticmethod
    def from_dict(values: dict) -> "Job":
        known = {f.name for f in fields(Job)}
        return Job(**{k: v for k, v in values.items() if k in known})


class JobLog:
    """The jobs table; one connection, serialised by a lock (writes are rare and small)."""

    def __init__(self, path: str | Path):
        self._db = sqlite3.connect(Path(path), timeout=30, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def recover(self) -> list[Job]:
        """All jobs, oldest first; those a dead process left unfinished are marked FAILED first."""
        jobs = [Job.from_dict(json.loads(row[0])) for row in
                self._db.execute("SELECT job FROM adaptation_jobs ORDER BY number")]
        for job in jobs:
            if job.state not in FINAL_STATES:
                job.message = (f"interrupted: the server stopped while the job was {job.state.lower()} "
                               f"({job.stage or 'not started'}); the registry serves what was last activated")
                job.state = "FAILED"
                self.save(job)
        return jobs

    def save(self, job: Job) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO adaptation_jobs (number, state, job) VALUES (?, ?, ?)",
                             (job.number, job.state, json.dumps(asdict(job))))

    def close(self) -> None:
        with self._lock:
            self._db.close()
