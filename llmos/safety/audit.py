"""The audit log: one row in the store's `safety_audit` table per finding that acted (what
fired, on what, which action). The checked text is kept only when the policy says
`audit: {store_text: true}`."""

from __future__ import annotations

import time

from llmos.safety.guard import Verdict
from llmos.safety.policy import Policy


def record_audit(store, where: str, verdict: Verdict, text: str | None = None, policy: Policy | None = None,
                 model: str | None = None) -> int:
    """Write the verdict's findings (those whose action is not allow) under `where`, e.g.
    "cli:write", "api:/v1/completions", "prompt", and the model that wrote the text if any.
    Returns the number of rows written."""
    findings = [f for f in verdict.findings if f.action != "allow"]
    if not findings:
        return 0
    keep = text if text is not None else verdict.original
    keep = keep if policy is not None and policy.store_text else None
    now = time.time()
    rows = [(now, where, f.category, f.action, f.rule, f.source, model, f.start, f.end, f.score, keep) for f in findings]
    with store.transaction() as db:
        db.executemany("INSERT INTO safety_audit (created_at, place, category, action, rule, source, model, span_start, span_end, score, text)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    return len(rows)


def list_audit(store, limit: int = 50, since: float | None = None) -> list[dict]:
    """The newest rows first: {id, time, where, category, action, rule, source, model, start, end, score, text}."""
    with store.lock:
        rows = store.db.execute(
            "SELECT * FROM safety_audit WHERE created_at >= ? ORDER BY id DESC LIMIT ?",
            (since if since is not None else 0.0, int(limit))).fetchall()
    return [{"id": r["id"], "time": r["created_at"], "where": r["place"], "category": r["category"],
             "action": r["action"], "rule": r["rule"], "source": r["source"], "model": r["model"], "start": r["span_start"],
             "end": r["span_end"], "score": r["score"], "text": r["text"]} for r in rows]
