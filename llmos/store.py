"""The SQLite store in $LLMOS_HOME: studio projects (and, in later migrations, chat sessions).

The schema changes only through numbered, append-only migrations, each applied once in its own
transaction and recorded in `migrations`. WAL mode and a busy timeout let several processes
read and write the same file.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

from llmos.settings import llmos_home

MIGRATIONS: list[tuple[str, str]] = [
    ("m001_projects", """
        CREATE TABLE projects (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            data TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        );
    """),
]


class StoreError(ValueError):
    pass


def default_path() -> Path:
    return llmos_home() / "llmos.db"


class Store:
    def __init__(self, path: str | Path | None = None):
        self.path = Path(path or default_path())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, check_same_thread=False, timeout=10, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA busy_timeout=10000")
            self.db.execute("PRAGMA foreign_keys=ON")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path} is not a usable SQLite database ({e}); move it aside to start afresh") from None
        self.db.row_factory = sqlite3.Row
        self.lock = threading.RLock()
        self.migrate()

    def migrate(self):
        with self.lock:
            self.db.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
            done = {r[0] for r in self.db.execute("SELECT name FROM migrations")}
            for name, sql in MIGRATIONS:
                if name in done:
                    continue
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    if self.db.execute("SELECT 1 FROM migrations WHERE name = ?", (name,)).fetchone() is None:
                        for statement in [s for s in sql.split(";") if s.strip()]:
                            self.db.execute(statement)
                        self.db.execute("INSERT INTO migrations VALUES (?, ?)", (name, time.time()))
                    self.db.execute("COMMIT")
                except Exception:
                    self.db.execute("ROLLBACK")
                    raise

    # -- projects --

    def list_projects(self) -> list[dict]:
        with self.lock:
            rows = self.db.execute("SELECT id, name, created_at, updated_at FROM projects ORDER BY updated_at DESC")
            return [dict(r) for r in rows]

    def get_project(self, project_id: int) -> dict:
        with self.lock:
            r = self.db.execute("SELECT * FROM projects WHERE id = ?", (project_id,)).fetchone()
        if r is None:
            raise KeyError(project_id)
        return {**dict(r), "data": json.loads(r["data"])}

    def save_project(self, name: str, data: dict, project_id: int | None = None) -> dict:
        now = time.time()
        blob = json.dumps(data, ensure_ascii=False)
        with self.lock:
            if project_id is None:
                cur = self.db.execute("INSERT INTO projects (name, data, created_at, updated_at) VALUES (?, ?, ?, ?)",
                                      (name, blob, now, now))
                project_id = cur.lastrowid
            else:
                cur = self.db.execute("UPDATE projects SET name = ?, data = ?, updated_at = ? WHERE id = ?",
                                      (name, blob, now, project_id))
                if cur.rowcount == 0:
                    raise KeyError(project_id)
        return self.get_project(project_id)

    def delete_project(self, project_id: int):
        with self.lock:
            if self.db.execute("DELETE FROM projects WHERE id = ?", (project_id,)).rowcount == 0:
                raise KeyError(project_id)
