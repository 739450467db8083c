"""Story mode: a story project in one JSON file, and the context sent to the model.

The context is assembled, in this order, from:
- Memory: always present (premise, style, main characters);
- Lorebook entries chosen by the one lorebook engine (writing/lorebook.py: keys in the recent
  text, the last `scan_depth` characters, secondary keys, recursion, probability, groups), most
  important first (higher priority), within `lore_budget` tokens, placed by their position:
  before or after Memory, beside the Author's Note, or `depth` lines before the end;
- the story text, cut from the start to fit the model's window, with the Author's Note inserted
  `authors_note_depth` lines before the end (close enough to steer the next sentences).
`explain_context` reports every part with its size and the reason it is there.

A story file is written atomically (temporary file, then rename) and the previous version is
kept as FILE.bak; an update that would leave the file with less text than it held is refused.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from llmos.cards import Card
from llmos.writing.lorebook import LoreEntry, LorebookError, activate, entry_from_dict, read_entries

__all__ = ["ContextPart", "LoreEntry", "Story", "StoryError", "assemble_context", "continue_story"]


class StoryError(ValueError):
    pass


@dataclass
class Story:
    title: str = ""
    text: str = ""
    memory: str = ""
    authors_note: str = ""
    authors_note_depth: int = 3
    lorebook: list[LoreEntry] = field(default_factory=list)
    lore_budget: int = 300  # tokens
    scan_depth: int = 2000  # characters of recent text searched for lore keywords
    sampler: dict = field(default_factory=lambda: {"temperature": 0.8, "top_p": 0.95, "repetition_penalty": 1.1,
                                                   "max_tokens": 120})
    model: str | None = None
    version: int = 1

    @classmethod
    def from_dict(cls, data: dict, where: str = "story") -> Story:
        if not isinstance(data, dict):
            raise StoryError(f"{where}: a story file must hold a JSON object")
        known = {f.name: f for f in fields(cls)}
        unknown = set(data) - set(known)
        if unknown:
            raise StoryError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        types = {"title": str, "text": str, "memory": str, "authors_note": str, "authors_note_depth": int,
                 "lore_budget": int, "scan_depth": int, "sampler": dict, "lorebook": list, "version": int}
        for key, typ in types.items():
            if key in data and not isinstance(data[key], typ):
                raise StoryError(f"{where}: field {key!r} must be {typ.__name__}, got {type(data[key]).__name__}")
        if "model" in data and data["model"] is not None and not isinstance(data["model"], str):
            raise StoryError(f"{where}: field 'model' must be a string")
        try:
            lore = [entry_from_dict(e, f"{where}: lorebook entry {i}") for i, e in enumerate(data.get("lorebook", []))]
        except LorebookError as e:
            raise StoryError(str(e)) from None
        return cls(**{**{k: v for k, v in data.items() if k != "lorebook"}, "lorebook": lore})

    @classmethod
    def load(cls, path: str | Path) -> Story:
        path = Path(path)
        if not path.is_file():
            raise StoryError(f"{path} does not exist; create it with `llmos story new {path}`")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StoryError(f"{path} is not valid JSON ({e}); the previous version may be in {path}.bak") from None
        return cls.from_dict(data, str(path))

    def save(self, path: str | Path, allow_shorter: bool = False):
        path = Path(path)
        if path.exists() and not allow_shorter:
            try:
                old = json.loads(path.read_text(encoding="utf-8"))
                if len(self.text) < len(old.get("text", "")):
                    raise StoryError(f"refusing to save {path} with less text than it holds "
                                     f"({len(self.text)} < {len(old.get('text', ''))} characters)")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                pass  # an unreadable old file is kept as the backup below
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(asdict(self), f, ensure_ascii=False, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            shutil.copy2(path, path.with_name(path.name + ".bak"))
        tmp.replace(path)

    def add_card(self, card: Card):
        """Merge a character card (or lorebook): its description into Memory, its lore entries
        into the Lorebook, its first message as the opening if the story is empty."""
        parts = [f"{card.name}: {card.description}".strip(": ") if card.description else ""]
        if card.personality:
            parts.append(f"{card.name}'s personality: {card.personality}")
        if card.scenario:
            parts.append(f"Scenario: {card.scenario}")
        block = "\n".join(p for p in parts if p)
        if block and block not in self.memory:
            self.memory = (self.memory + "\n" + block).strip()
        if card.book:
            try:
                self.lorebook += read_entries(card.book, card.name)
            except LorebookError as e:
                raise StoryError(str(e)) from None
        if not self.text and card.first_message:
            self.text = card.first_message
        if not self.title and not card.is_lorebook:
            self.title = card.name


@dataclass
class ContextPart:
    kind: str  # memory | lore | story | authors_note
    text: str
    tokens: int
    reason: str


def assemble_context(story: Story, tokenizer, window: int, max_tokens: int) -> tuple[str, list[ContextPart]]:
    """The prompt for continuing `story`, and what went into it (see the module docstring)."""
    budget = window - max_tokens - 8
    if budget <= 16:
        raise StoryError(f"the model's window ({window}) leaves no room for context with max_tokens={max_tokens}")

    def count(text: str) -> int:
        if not text:
            return 0
        if tokenizer is None:  # a remote model: about four characters a token
            return len(text) // 4 + 1
        return len(tokenizer.encode(text, add_bos=False))

    parts: list[ContextPart] = []
    used = 0
    memory = story.memory.strip()
    if memory:
        used += count(memory)
    lore = activate(story.lorebook, lambda depth: _recent(story, depth), count, max(0, min(story.lore_budget, budget - used)),
                    rng=random.Random(len(story.text)))
    head: dict[str, list[ContextPart]] = {}
    at_depth: list[tuple[int, ContextPart]] = []
    placement = {"before_char": "before Memory", "after_char": "after Memory", "em_top": "after Memory",
                 "em_bottom": "after Memory", "an_top": "just before the Author's Note",
                 "an_bottom": "just after the Author's Note", "at_depth": "{depth} lines before the end"}
    for f in lore.placed:
        e = f.entry
        if e.position == "outlet":
            parts.append(ContextPart("lore-skipped", e.content, f.tokens, f"Lorebook {e.label!r}: {f.why}: left out, "
                                     f"an outlet entry is placed only where a prompt names its outlet"))
            continue
        where = placement[e.position].format(depth=e.depth)
        head.setdefault(e.position, []).append(ContextPart("lore", e.content.strip(), f.tokens,
                                                           f"Lorebook {e.label!r}: {f.why}; placed {where}"))
        if e.position == "at_depth":
            at_depth.append((e.depth, head[e.position][-1]))
        used += f.tokens
    for f in lore.left_out:
        parts.append(ContextPart("lore-skipped", f.entry.content, f.tokens or count(f.entry.content),
                                 f"Lorebook {f.entry.label!r}: {f.why}"))
    for warning in lore.warnings:
        parts.append(ContextPart("lore-warning", "", 0, warning))
    before = head.get("before_char", [])
    after = [p for pos in ("after_char", "em_top", "em_bottom") for p in head.get(pos, [])]
    parts[:0] = [*before, *([ContextPart("memory", memory, count(memory), "Memory: always included")] if memory else []), *after]
    note = f"[Author's note: {story.authors_note.strip()}]" if story.authors_note.strip() else ""
    if head.get("an_top") or head.get("an_bottom"):  # lore that travels with the note
        note = "\n".join([*(p.text for p in head.get("an_top", [])), *([note] if note else []),
                          *(p.text for p in head.get("an_bottom", []))])
    room = budget - used - count(note) - 4
    text = story.text
    cut = 0
    if count(text) > room:  # keep the end of the story: drop whole lines from the start
        lines = text.split("\n")
        while len(lines) > 1 and count("\n".join(lines)) > room:
            lines.pop(0)
        kept = "\n".join(lines)
        if count(kept) > room:  # one very long line: keep its last `room` tokens
            if tokenizer is None:
                kept = kept[-4 * room:] if room > 0 else ""
            else:
                ids = tokenizer.encode(kept, add_bos=False)
                kept = tokenizer.decode(ids[-room:]) if room > 0 else ""
        cut = len(text) - len(kept)
        text = kept
    if note:
        lines = text.split("\n")
        depth = min(max(story.authors_note_depth, 0), len(lines))
        at = len(lines) - depth
        text = "\n".join(lines[:at] + [note] + lines[at:]) if text else note
    for depth, p in at_depth:
        lines = text.split("\n")
        at = len(lines) - min(max(depth, 0), len(lines))
        text = "\n".join(lines[:at] + [p.text] + lines[at:])
    reason = "Story text" + (f": the first {cut} characters left out to fit the window" if cut else ", whole")
    parts.append(ContextPart("story", text, count(text), reason))
    if note:
        parts.append(ContextPart("authors_note", note, count(note),
                                 f"Author's Note: inserted {story.authors_note_depth} lines before the end"))
    parts += [p for pos in ("an_top", "an_bottom", "at_depth") for p in head.get(pos, [])]
    top = [p.text for p in (*before, *([ContextPart("memory", memory, 0, "")] if memory else []), *after)]
    prompt = ("\n".join(top) + "\n***\n" if top else "") + text
    return prompt, parts


def _recent(story: Story, depth: int | None) -> str:
    """What a lore entry searches: the last `scan_depth` characters of the story, or, for an entry
    with its own depth, its last `depth` lines."""
    if depth is None:
        return story.text[-story.scan_depth:] if story.scan_depth > 0 else ""
    lines = [line for line in story.text.split("\n") if line.strip()]
    return "\n".join(lines[-depth:]) if depth > 0 else ""


def continue_story(llm, story: Story, n: int = 1, max_tokens: int | None = None, seed: int | None = None,
                   result=None, sampler: dict | None = None, banned_strings: list[str] | None = None,
                   banned_regex: bool = False):
    """Stream the continuation of `story` (plain completion: the story is the prompt). `sampler`
    overrides the story's own sampler settings; banned strings rewind and sample again (llm.py)."""
    given = {k: v for k, v in (sampler or {}).items() if v is not None}
    settings = {**story.sampler, **given, **({"max_tokens": max_tokens} if max_tokens else {}),
                **({"seed": seed} if seed is not None else {})}
    params = llm.sampling(**settings)
    prompt, _ = assemble_context(story, llm.tokenizer, llm.context_window, params.max_tokens)
    return llm.stream(prompt, params, n=n, result=result, banned_strings=banned_strings, banned_regex=banned_regex)
