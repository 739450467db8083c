"""Chat sessions in the SQLite store: turns, ratings, pinned facts, the rolling summary.

Nothing is deleted by /undo, /retry, /edit or /swipe: the turns they replace are marked
inactive, so they stay in exports (and in the data for preference training) but leave the
conversation, and a swipe can make one active again.
"""

from __future__ import annotations

import json
import time

from llmos.chat.personas import Persona
from llmos.db import Store


class SessionError(ValueError):
    pass


class Sessions:
    def __init__(self, store: Store):
        self.store = store

    def create(self, persona: Persona, model: str = "", kb: str | None = None) -> int:
        now = time.time()
        with self.store.transaction() as db:
            return db.execute(
                "INSERT INTO chat_sessions (persona, persona_data, model, kb, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                (persona.name, json.dumps(persona.to_dict(), ensure_ascii=False), model, kb, now, now)).lastrowid

    def get(self, session_id: int) -> dict:
        with self.store.lock:
            row = self.store.db.execute("SELECT * FROM chat_sessions WHERE id = ?", (session_id,)).fetchone()
        if row is None:
            raise SessionError(f"no chat session {session_id}; `llmos sessions` lists them")
        return dict(row)

    def list(self) -> list[dict]:
        with self.store.lock:
            rows = self.store.db.execute("""
                SELECT s.id, s.title, s.persona, s.model, s.kb, s.status, s.handover, s.created_at, s.updated_at,
                       (SELECT COUNT(*) FROM chat_turns t WHERE t.session_id = s.id AND t.active = 1 AND t.role = 'user') AS user_turns,
                       (SELECT content FROM chat_turns t WHERE t.session_id = s.id AND t.role = 'user' ORDER BY t.id LIMIT 1) AS first_message
                FROM chat_sessions s ORDER BY s.updated_at DESC""")
            return [dict(r) for r in rows]

    def update(self, session_id: int, **fields):
        allowed = {"title", "persona", "persona_data", "model", "kb", "summary", "summary_upto", "status",
                   "handover", "handover_reason", "unhappy"}
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"unknown session field(s): {', '.join(sorted(bad))}")
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self.store.transaction() as db:
            db.execute(f"UPDATE chat_sessions SET {sets}, updated_at = ? WHERE id = ?",
                       (*fields.values(), time.time(), session_id))

    def delete(self, session_id: int):
        self.get(session_id)
        with self.store.transaction() as db:
            db.execute("DELETE FROM chat_sessions WHERE id = ?", (session_id,))

    # -- turns --

    def add_turn(self, session_id: int, role: str, content: str, *, active: bool = True, **meta) -> int:
        now = time.time()
        with self.store.transaction() as db:
            turn = db.execute("INSERT INTO chat_turns (session_id, role, content, active, meta, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                              (session_id, role, content, int(active), json.dumps(meta, ensure_ascii=False), now)).lastrowid
            db.execute("UPDATE chat_sessions SET updated_at = ? WHERE id = ?", (now, session_id))
        return turn

    def turns(self, session_id: int, include_inactive: bool = False) -> list[dict]:
        where = "" if include_inactive else " AND active = 1"
        with self.store.lock:
            rows = self.store.db.execute(
                f"SELECT id, role, content, active, rating, meta, created_at FROM chat_turns WHERE session_id = ?{where} ORDER BY id",
                (session_id,))
            return [{**dict(r), "meta": json.loads(r["meta"])} for r in rows]

    def deactivate(self, turn_ids: list[int]):
        if turn_ids:
            with self.store.transaction() as db:
                db.executemany("UPDATE chat_turns SET active = 0 WHERE id = ?", [(t,) for t in turn_ids])

    def select(self, turn_id: int, others: list[int]):
        """Make one turn active and its alternatives inactive, in one transaction (a swipe)."""
        with self.store.transaction() as db:
            db.executemany("UPDATE chat_turns SET active = 0 WHERE id = ?", [(t,) for t in others if t != turn_id])
            db.execute("UPDATE chat_turns SET active = 1 WHERE id = ?", (turn_id,))

    def rate(self, turn_id: int, rating: int):
        with self.store.transaction() as db:
            db.execute("UPDATE chat_turns SET rating = ? WHERE id = ?", (rating, turn_id))

    # -- pinned facts --

    def add_fact(self, session_id: int, text: str, source: str = "user") -> bool:
        """Pin a fact; False if it was pinned already."""
        with self.store.transaction() as db:
            cur = db.execute("INSERT OR IGNORE INTO chat_facts (session_id, text, source, created_at) VALUES (?, ?, ?, ?)",
                             (session_id, text.strip(), source, time.time()))
            return cur.rowcount > 0

    def facts(self, session_id: int) -> list[str]:
        with self.store.lock:
            return [r[0] for r in self.store.db.execute("SELECT text FROM chat_facts WHERE session_id = ? ORDER BY id", (session_id,))]

    # -- export --

    def export(self, session_id: int, fmt: str = "md") -> str:
        s = self.get(session_id)
        turns = self.turns(session_id, include_inactive=True)
        facts = self.facts(session_id)
        if fmt == "json":
            record = {**s, "persona_data": json.loads(s["persona_data"]), "facts": facts, "turns": turns}
            return json.dumps(record, ensure_ascii=False, indent=2)
        if fmt != "md":
            raise SessionError(f"export format must be md or json, got {fmt!r}")
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(s["created_at"]))
        lines = [f"# Chat {s['id']}: {s['title'] or s['persona']}", "",
                 f"- persona: {s['persona']}", f"- model: {s['model'] or '-'}", f"- started: {when}",
                 f"- status: {s['status']}" + (f" (handed over: {s['handover_reason']})" if s["handover"] else "")]
        if s["kb"]:
            lines.append(f"- knowledge base: {s['kb']}")
        if facts:
            lines += ["", "## Pinned facts", "", *(f"- {f}" for f in facts)]
        if s["summary"]:
            lines += ["", "## Summary of earlier turns", "", s["summary"]]
        lines += ["", "## Conversation", ""]
        for t in turns:
            who = "**You**" if t["role"] == "user" else f"**{s['persona']}**"
            note = "" if t["active"] else " _(replaced)_"
            if t["rating"] is not None:
                note += f" _(rated {t['rating']})_"
            lines += [f"{who}{note}: {t['content']}", ""]
        return "\n".join(lines)
