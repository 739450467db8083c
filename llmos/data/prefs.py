"""Preference pairs in the store: a prompt, the answer the writer preferred and the one they did not.

They come from what writers already do: rating chat replies and retrying them, keeping one
branch or candidate in the studio, picking one of `llmos write -n N`'s candidates, or a JSONL
file. `choice_pairs` turns one such choice into pairs, the same way for every source.

A prompt is stored as JSON: a list of chat messages (what an instruct model was sent) or a
string (a text the model continued: a story, a base model's prompt). Training renders each
the way the model read it (data/sft.py for chats). A pair is stored once: the same prompt,
chosen and rejected again are ignored.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from llmos.db import Store

SOURCES = {
    "chat-rating": "two replies to one chat message rated differently",
    "chat-retry": "a chat reply the writer went on from, over the replies it replaced (/retry)",
    "studio-thumbs": "studio candidates marked up and down",
    "studio-pick": "the studio candidate inserted into the story, over the others",
    "studio-branch": "the story branch the writer continued, over its siblings",
    "write-pick": "the candidate picked from `llmos write -n N --pick`",
    "import": "a JSONL file (`llmos prefs import`)",
}
ROLES = ("system", "user", "assistant")
GOOD = 4  # on chat's 1-5 scale (thumbs up is stored as 5)


class PrefsError(ValueError):
    """A malformed pair or file; the message says which and what to do."""


@dataclass
class Pair:
    prompt: str | list[dict]
    chosen: str
    rejected: str
    source: str = "import"
    model: str = ""
    meta: dict = field(default_factory=dict)
    id: int | None = None
    created_at: float | None = None

    def as_dict(self) -> dict:
        """The JSONL record `export` writes and `import_jsonl` reads back."""
        return {"id": self.id, "prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected,
                "source": self.source, "model": self.model, "meta": self.meta, "created_at": self.created_at}

    @property
    def key(self) -> str:
        blob = json.dumps([self.prompt, self.chosen, self.rejected], ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def choice_pairs(candidates: list[str], kept: int | None = None,
                 ratings: list[int | None] | None = None) -> list[tuple[int, int]]:
    """(chosen, rejected) index pairs from one choice among candidates for the same prompt: the
    kept one over each other, and each rated candidate over each rated lower. A rating outweighs
    a keep: the kept candidate is not put over one rated higher, nor, when it has no rating
    itself, over one rated GOOD or more. Identical texts never make a pair."""
    n = len(candidates)
    ratings = list(ratings) if ratings is not None else [None] * n
    if len(ratings) != n:
        raise PrefsError(f"{len(ratings)} ratings for {n} candidates")
    if kept is not None and not 0 <= kept < n:
        raise PrefsError(f"the kept candidate {kept} is not one of the {n}")
    out: list[tuple[int, int]] = []

    def add(a: int, b: int):
        if a != b and candidates[a].strip() != candidates[b].strip() and (a, b) not in out and (b, a) not in out:
            out.append((a, b))

    if kept is not None:
        for j in range(n):
            if ratings[j] is not None and (ratings[j] >= GOOD if ratings[kept] is None else ratings[j] > ratings[kept]):
                continue
            add(kept, j)
    for i in range(n):
        for j in range(n):
            if ratings[i] is not None and ratings[j] is not None and ratings[i] > ratings[j]:
                add(i, j)
    return out


def check_prompt(prompt, where: str) -> str | list[dict]:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        for i, m in enumerate(prompt):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise PrefsError(f"{where}: prompt[{i}] needs a role ({', '.join(ROLES)}) and a string content")
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise PrefsError(f"{where}: 'prompt' must be a string or a non-empty list of chat messages")


def _answer(value, side: str, where: str) -> str:
    """An answer given as a string, or as messages ending with the assistant's (TRL's
    conversational shape)."""
    if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
        value = value[-1].get("content")
    if not isinstance(value, str):
        raise PrefsError(f"{where}: '{side}' must be a string (or messages ending with the assistant's)")
    if not value.strip():
        raise PrefsError(f"{where}: '{side}' is empty; a pair needs two answers")
    return value


def record_to_pair(record, where: str, source: str = "import") -> Pair:
    """One JSONL record -> a Pair. Takes {prompt, chosen, rejected}, with a string or chat
    messages for the prompt and strings (or messages ending with the answer) for the two sides."""
    if not isinstance(record, dict):
        raise PrefsError(f"{where}: a record must be a JSON object with prompt, chosen and rejected")
    missing = [k for k in ("chosen", "rejected") if k not in record]
    if missing:
        have = "chosen" if "chosen" in record else "rejected" if "rejected" in record else None
        raise PrefsError(f"{where}: no '{missing[0]}' field" + (
            f"; a preference set needs both sides of each pair (records with '{have}' only are one-sided: "
            f"use them for `llmos finetune` without --dpo)" if have else "; expected prompt, chosen and rejected"))
    if "prompt" not in record:
        raise PrefsError(f"{where}: no 'prompt' field")
    prompt = check_prompt(record["prompt"], where)
    chosen, rejected = _answer(record["chosen"], "chosen", where), _answer(record["rejected"], "rejected", where)
    if chosen.strip() == rejected.strip():
        raise PrefsError(f"{where}: 'chosen' and 'rejected' are the same text; a pair needs two different answers")
    meta = record.get("meta") or {}
    if not isinstance(meta, dict):
        raise PrefsError(f"{where}: 'meta' must be an object")
    return Pair(prompt, chosen, rejected, str(record.get("source") or source), str(record.get("model") or ""), meta)


def read_jsonl(path: str | Path, source: str = "import") -> list[Pair]:
    """Every pair of a JSONL file, or PrefsError naming the first bad line; nothing partial."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PrefsError(f"cannot read {path}: {e}") from None
    pairs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PrefsError(f"{path}:{n}: not JSON ({e.msg})") from None
        pairs.append(record_to_pair(record, f"{path}:{n}", source))
    if not pairs:
        raise PrefsError(f"{path} holds no pairs; each line is {{\"prompt\": ..., \"chosen\": ..., \"rejected\": ...}}")
    return pairs


class Preferences:
    """The preference pairs of the store."""

    def __init__(self, store: Store):
        self.store = store

    def add(self, pairs: Iterable[Pair]) -> int:
        """Store pairs in one transaction; returns how many were new."""
        now, added = time.time(), 0
        with self.store.transaction() as db:
            for p in pairs:
                if p.source not in SOURCES:
                    raise PrefsError(f"unknown source {p.source!r}; known: {', '.join(SOURCES)}")
                cur = db.execute(
                    "INSERT OR IGNORE INTO preferences (created_at, source, prompt, chosen, rejected, model, meta, key) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (p.created_at or now, p.source, json.dumps(p.prompt, ensure_ascii=False), p.chosen, p.rejected,
                     p.model, json.dumps(p.meta, ensure_ascii=False), p.key))
                added += cur.rowcount
        return added

    def record_choice(self, prompt: str | list[dict], candidates: list[str], *, kept: int | None = None,
                      ratings: list[int | None] | None = None, source: str, model: str = "",
                      meta: dict | None = None) -> int:
        """Store the pairs one choice among candidates gives (see `choice_pairs`); returns how
        many were new."""
        prompt = check_prompt(prompt, "the prompt")
        pairs = [Pair(prompt, candidates[a], candidates[b], source, model, dict(meta or {}))
                 for a, b in choice_pairs(candidates, kept, ratings)]
        return self.add(pairs) if pairs else 0

    def list(self, source: str | None = None, limit: int | None = None, model: str | None = None) -> list[Pair]:
        where, args = [], []
        if source:
            where.append("source = ?")
            args.append(source)
        if model:
            where.append("model = ?")
            args.append(model)
        sql = "SELECT * FROM preferences" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id"
        if limit:
            sql += f" LIMIT {int(limit)}"
        with self.store.lock:
            rows = self.store.db.execute(sql, args).fetchall()
        return [Pair(json.loads(r["prompt"]), r["chosen"], r["rejected"], r["source"], r["model"], json.loads(r["meta"]),
                     r["id"], r["created_at"]) for r in rows]

    def stats(self) -> list[dict]:
        """Per source: pairs, distinct prompts, mean lengths (characters), first and last."""
        with self.store.lock:
            rows = self.store.db.execute("""
                SELECT source, COUNT(*) AS pairs, COUNT(DISTINCT prompt) AS prompts,
                       AVG(LENGTH(chosen)) AS chosen_chars, AVG(LENGTH(rejected)) AS rejected_chars,
                       MIN(created_at) AS first, MAX(created_at) AS last
                FROM preferences GROUP BY source ORDER BY source""").fetchall()
        return [dict(r) for r in rows]

    def delete(self, ids: list[int]) -> int:
        with self.store.transaction() as db:
            return sum(db.execute("DELETE FROM preferences WHERE id = ?", (i,)).rowcount for i in ids)

    def export(self, path: str | Path | None = None, source: str | None = None) -> str | int:
        """JSONL of the pairs (the shape `import_jsonl` reads); written to path (returns the
        count) or returned as text."""
        text = "".join(json.dumps(p.as_dict(), ensure_ascii=False) + "\n" for p in self.list(source))
        if path is None:
            return text
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        return text.count("\n")

    def import_jsonl(self, path: str | Path) -> tuple[int, int]:
        """(new pairs, pairs in the file): all of them or, on a bad line, none."""
        pairs = read_jsonl(path)
        return self.add(pairs), len(pairs)


# -- a preference dataset: the pairs tokenized the way the model reads them --------------------


def encode_pair(tokenizer, pair: Pair) -> tuple[tuple[list[int], int], tuple[list[int], int]]:
    """((ids, answer_start), (ids, answer_start)) for the chosen and the rejected side: the
    prompt followed by the answer, the answer's tokens from answer_start on. A chat prompt goes
    through the model's template (data/sft.py), the answer ending with its end-of-turn marker;
    a text prompt is continued as it is."""
    from llmos.data.sft import render

    sides = []
    for answer in (pair.chosen, pair.rejected):
        if isinstance(pair.prompt, str):
            head = tokenizer.encode(pair.prompt)
            ids = head + tokenizer.encode(answer, add_bos=False)
            sides.append((ids, len(head)))
            continue
        ids, mask = render(tokenizer, [*pair.prompt, {"role": "assistant", "content": answer}])
        end = max(i for i, m in enumerate(mask) if m) + 1  # the last assistant span: this answer
        start = end
        while start > 0 and mask[start - 1]:
            start -= 1
        sides.append((ids[:end], start))
    return sides[0], sides[1]


def split_by_prompt(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, held out): every pair of one prompt on the same side, so that held-out accuracy
    is measured on prompts the model was not trained on."""
    import random

    prompts = sorted({json.dumps(p.prompt, ensure_ascii=False, sort_keys=True) for p in pairs})
    if len(prompts) < 2:
        raise PrefsError(f"the {len(pairs)} pair(s) share one prompt; held-out pairs need another: collect pairs "
                         f"for two prompts or more")
    random.Random(seed).shuffle(prompts)
    n_val = min(len(prompts) - 1, max(1, round(fraction * len(prompts))))
    held = set(prompts[:n_val])
    out: tuple[list[Pair], list[Pair]] = ([], [])
    for p in pairs:
        out[json.dumps(p.prompt, ensure_ascii=False, sort_keys=True) in held].append(p)
    return out


def prepare_preferences(pairs: list[Pair], model: str, out: str | Path, val_fraction: float = 0.1,
                        seed: int = 1337) -> dict:
    """Tokenize pairs with `model`'s tokenizer into a dataset folder for `--objective dpo`:
    per split, ids.npy (every sequence end to end), index.npy (rows of chosen start, chosen
    answer start, chosen end, then the same for rejected) and pairs.jsonl; meta.json and
    tokenizer.json as `llmos prepare` writes them. Returns the report."""
    import numpy as np

    from llmos.data.prepare import model_tokenizer, partial_dir, publish
    from llmos.weights import store as models

    if not pairs:
        raise PrefsError("no preference pairs to train on: rate chat replies, pick among candidates "
                         "(`llmos write -n 4 --pick ask`), or give a JSONL file of pairs")
    if not 0 < val_fraction < 1:
        raise PrefsError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    try:
        tok, info, source_meta = model_tokenizer(model)
    except models.ModelError as e:
        raise PrefsError(str(e)) from None
    train, val = split_by_prompt(pairs, val_fraction, seed)
    vocab_size = tok.hf.get_vocab_size(with_added_tokens=True)
    dtype = np.uint16 if vocab_size <= 65535 else np.uint32
    out = Path(out)
    tmp = partial_dir(out)
    meta = {"preference": True, "vocab_size": vocab_size, "dtype": np.dtype(dtype).name, "tokenizer": info,
            "eos_id": tok.eos_id, "instruction": False, "prompt_style": source_meta.get("prompt_style"),
            "model": info["kind"].removeprefix("model:")}
    report = {"model": meta["model"]}
    for split, chosen in (("train", train), ("val", val)):
        ids, index = [], []
        for p in chosen:
            row = []
            for seq, start in encode_pair(tok, p):
                base = len(ids)
                ids += seq
                row += [base, base + start, base + len(seq)]
            index.append(row)
        np.save(tmp / f"{split}.ids.npy", np.asarray(ids, dtype=dtype))
        np.save(tmp / f"{split}.index.npy", np.asarray(index, dtype=np.int64).reshape(-1, 6))
        with open(tmp / f"{split}.pairs.jsonl", "w", encoding="utf-8") as f:
            for p in chosen:
                f.write(json.dumps(p.as_dict(), ensure_ascii=False) + "\n")
        meta[split] = {"pairs": len(chosen), "tokens": len(ids)}
        report[f"{split}_pairs"], report[f"{split}_tokens"] = len(chosen), len(ids)
    report["sources"] = {s: sum(p.source == s for p in pairs) for s in sorted({p.source for p in pairs})}
    tok.hf.save(str(tmp / "tokenizer.json"))
    publish(tmp, out, meta, report)
    return report
