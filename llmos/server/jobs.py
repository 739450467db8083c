"""Long work started over HTTP (preparing a corpus, training, the n-gram baseline, export) runs
as the `llmos` command itself in a child process, so it behaves exactly as in a terminal (resume,
atomic checkpoints, Ctrl-C) and never slows the server's generation thread. Its output goes to a
log file in $LLMOS_HOME/jobs; a job is stopped as Ctrl-C stops the command."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmos.settings import llmos_home

LOG_TAIL = 4000  # characters of a job's output shown with it


@dataclass(eq=False)
class Job:
    id: int
    kind: str  # "prepare", "train", "ngram", "export"
    args: list[str]
    log: Path
    folder: str | None  # what it writes: a dataset, a run, an export
    process: subprocess.Popen
    started_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    stop_requested: bool = False

    @property
    def status(self) -> str:
        code = self.process.poll()
        if code is None:
            return "running"
        if self.ended_at is None:
            self.ended_at = time.time()
        if self.stop_requested and code != 0:
            return "stopped"
        return "done" if code == 0 else "failed"

    def to_dict(self, tail: bool = True) -> dict:
        status = self.status
        out = {"id": self.id, "kind": self.kind, "command": ["llmos", *self.args], "status": status,
               "returncode": self.process.poll(), "folder": self.folder, "started_at": self.started_at,
               "ended_at": self.ended_at}
        if tail:
            text = self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""
            out["log"] = text[-LOG_TAIL:]
            out["progress"] = self.progress()
        return out

    def progress(self) -> dict | None:
        """A training run's latest metrics line (step, loss, tokens/s...)."""
        if self.kind != "train" or not self.folder:
            return None
        metrics = Path(self.folder) / "metrics.jsonl"
        if not metrics.is_file():
            return None
        import json

        lines = metrics.read_text(encoding="utf-8").strip().splitlines()
        for line in reversed(lines):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written
        return None


class Jobs:
    def __init__(self):
        self.jobs: dict[int, Job] = {}
        self.lock = threading.Lock()

    @staticmethod
    def folder() -> Path:
        root = llmos_home() / "jobs"
        root.mkdir(parents=True, exist_ok=True)
        return root

    def start(self, kind: str, args: list[str], folder: str | None = None) -> Job:
        root = self.folder()
        with self.lock:
            job_id = max(self.jobs, default=0) + 1
            log = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{job_id}-{kind}.log"
            with log.open("wb") as out:
                process = subprocess.Popen([sys.executable, "-m", "llmos", *args], stdout=out, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, env=_env(),
                                           preexec_fn=_interruptible if sys.platform != "win32" else None)
            job = self.jobs[job_id] = Job(job_id, kind, args, log, folder, process)
        return job

    def get(self, job_id: int) -> Job | None:
        return self.jobs.get(job_id)

    def list(self) -> list[Job]:
        return sorted(self.jobs.values(), key=lambda j: j.id, reverse=True)

    def stop(self, job: Job):
        """Ctrl-C: a training run keeps its last checkpoint and can be resumed."""
        if job.process.poll() is None:
            job.stop_requested = True
            job.process.send_signal(signal.SIGINT)

    def close(self):
        for job in self.jobs.values():
            self.stop(job)
        for job in self.jobs.values():
            try:
                job.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                job.process.kill()


def _interruptible():
    """In the job's process: SIGINT as at a terminal, since stopping a job sends it. A server
    started in the background of a shell (`llmos serve &`, nohup) has SIGINT ignored, and a
    child would inherit that and never stop."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _env() -> dict:
    import os

    return {**os.environ, "COLUMNS": "120", "PYTHONUNBUFFERED": "1"}
