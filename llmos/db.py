"""The SQLite store in $LLMOS_HOME: studio projects, chat sessions, knowledge bases, the safety
audit log and preference pairs.

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
    ("m002_chat", """
        CREATE TABLE chat_sessions (
            id INTEGER PRIMARY KEY,
            title TEXT NOT NULL DEFAULT '',
            persona TEXT NOT NULL,
            persona_data TEXT NOT NULL,
            model TEXT NOT NULL DEFAULT '',
            kb TEXT,
            summary TEXT NOT NULL DEFAULT '',
            summary_upto INTEGER NOT NULL DEFAULT 0,
            status TEXT NOT NULL DEFAULT 'open',
            handover INTEGER NOT NULL DEFAULT 0,
            handover_reason TEXT NOT NULL DEFAULT '',
            unhappy INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        );
        CREATE TABLE chat_turns (
            id INTEGER PRIMARY KEY,
            session_id INTEGER NOT NULL REFERENCES chat_sessions(id) ON DELETE CASCADE,
            role TEXT NOT NULL,
            content TEXT NOT NULL,
            active INTEGER NOT NULL DEFAULT 1,
            rating INTEGER,
            meta TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL
        );
        CREATE INDEX chat_turns_session ON chat_turns(session_id, id);
        CREATE TABLE chat_facts (
            id INTEGER PRIMARY KEY,
            session_id INTEGER NOT NULL REFERENCES chat_sessions(id) ON DELETE CASCADE,
            text TEXT NOT NULL,
            source TEXT NOT NULL,
            created_at REAL NOT NULL,
            UNIQUE(session_id, text)
        );
    """),
    ("m003_knowledge_bases", """
        CREATE TABLE kb_bases (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            embedder TEXT NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE TABLE kb_documents (
            id INTEGER PRIMARY KEY,
            kb_id INTEGER NOT NULL REFERENCES kb_bases(id) ON DELETE CASCADE,
            path TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            added_at REAL NOT NULL,
            UNIQUE(kb_id, path)
        );
        CREATE TABLE kb_passages (
            id INTEGER PRIMARY KEY,
            doc_id INTEGER NOT NULL REFERENCES kb_documents(id) ON DELETE CASCADE,
            kb_id INTEGER NOT NULL REFERENCES kb_bases(id) ON DELETE CASCADE,
            ord INTEGER NOT NULL,
            heading TEXT NOT NULL DEFAULT '',
            text TEXT NOT NULL,
            question TEXT,
            answer TEXT,
            vector BLOB NOT NULL
        );
        CREATE INDEX kb_passages_kb ON kb_passages(kb_id);
    """),
    ("m004_safety_audit", """
        CREATE TABLE safety_audit (
            id INTEGER PRIMARY KEY,
            created_at REAL NOT NULL,
            place TEXT NOT NULL,
            category TEXT NOT NULL,
            action TEXT NOT NULL,
            rule TEXT NOT NULL,
            source TEXT NOT NULL,
            model TEXT,
            span_start INTEGER,
            span_end INTEGER,
            score REAL,
            text TEXT
        );
        CREATE INDEX safety_audit_time ON safety_audit(created_at);
    """),
    ("m005_preferences", """
        CREATE TABLE preferences (
            id INTEGER PRIMARY KEY,
            created_at REAL NOT NULL,
            source TEXT NOT NULL,
            prompt TEXT NOT NULL,
            chosen TEXT NOT NULL,
            rejected TEXT NOT NULL,
            model TEXT NOT NULL DEFAULT '',
            meta TEXT NOT NULL DEFAULT '{}',
            key TEXT NOT NULL UNIQUE
        );
        CREATE INDEX preferences_source ON preferences(source);
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
            for attempt in range(100):
                try:  # switching a new file to WAL is refused at once, not after the busy timeout,
                    self.db.execute("PRAGMA journal_mode=WAL")  # while another process creates it too
                    break
                except sqlite3.OperationalError as e:
                    if "locked" not in str(e) or attempt == 99:
                        raise
                    time.sleep(0.05)
            self.db.execute("PRAGMA busy_timeout=10000")
            self.db.execute("PRAGMA foreign_keys=ON")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path} is not a usable SQLite database ({e}); move it aside to start afresh") from None
        self.db.row_factory = sqlite3.Row
        self.lock = threading.RLock()
        self.migrate()

    def transaction(self):
        """`with store.transaction():` runs its statements as one IMMEDIATE transaction."""
        return _Transaction(self)

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


class _Transaction:
    def __init__(self, store: Store):
        self.store = store

    def __enter__(self):
        self.store.lock.acquire()
        self.store.db.execute("BEGIN IMMEDIATE")
        return self.store.db

    def __exit__(self, kind, value, tb):
        try:
            self.store.db.execute("COMMIT" if kind is None else "ROLLBACK")
        finally:
            self.store.lock.release()
