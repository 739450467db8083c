"""Lorebooks (World Info): the one engine that story mode and chat both use, and the file formats
it reads and writes.

Formats: SillyTavern World Info JSON (`entries` keyed by uid), the `character_book` embedded in
V2/V3 character cards (SillyTavern's own fields in each entry's `extensions`), and NovelAI
`.lorebook` files (`lorebookVersion` 1-6). Fields a format has that the engine does not use are
kept on the entry (`extra`) and written back when it is exported to the same format.

The engine (`activate`), for one prompt:
1. an enabled entry fires when it is `constant`, or when one of its keys is in the text it scans
   (its own `scan_depth` of recent messages, or the caller's window) and its secondary keys
   agree by its `logic`: and_any (any of them), and_all, not_any (none), not_all (not all);
   keys match case-insensitively unless `case_sensitive`, as whole words with `whole_words`,
   and as regular expressions when written `/like this/i`;
2. recursion: the content of what fired is scanned for more entries (not `prevent_recursion`
   entries' content; `exclude_recursion` entries only fire from the text itself), at most
   `max_steps` rounds; a lorebook still triggering itself after that is reported, not followed;
3. `probability` below 100 rolls for each entry that fired; of the entries sharing a `group` one
   stays, drawn by `group_weight` (or the highest priority with `group_override`);
4. the rest are placed by priority, highest first, within the token budget.
Every entry that fired or was left out carries the reason, for the context view.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import regex

POSITIONS = ("before_char", "after_char", "an_top", "an_bottom", "at_depth", "em_top", "em_bottom", "outlet")
LOGICS = ("and_any", "not_all", "not_any", "and_all")  # SillyTavern's selectiveLogic 0..3
ROLES = ("system", "user", "assistant")  # SillyTavern's role 0..2
NOVELAI_VERSIONS = range(1, 7)
MAX_STEPS = 3


class LorebookError(ValueError):
    pass


@dataclass
class LoreEntry:
    keys: list[str]
    content: str
    priority: int = 100  # higher is kept first under the budget (SillyTavern's `order`)
    enabled: bool = True
    case_sensitive: bool = False
    constant: bool = False  # always fires, keys or not
    name: str = ""
    secondary_keys: list[str] = field(default_factory=list)
    logic: str = "and_any"
    whole_words: bool = False
    position: str = "after_char"
    depth: int = 4  # for position at_depth: messages (chat) or lines (story) before the end
    role: str = "system"  # for position at_depth in chat
    probability: int = 100  # percent
    group: str = ""  # comma-separated group names
    group_weight: int = 100
    group_override: bool = False
    scan_depth: int | None = None  # recent messages (chat) or lines (story) searched; None: the caller's
    exclude_recursion: bool = False  # fires only from the text, never from other entries
    prevent_recursion: bool = False  # its content triggers no other entry
    regex: bool = False  # every key is a regular expression (V3 cards' use_regex)
    uid: str = ""
    origin: str = ""  # the format it was read from: world_info, character_book or novelai
    extra: dict = field(default_factory=dict)  # that format's fields the engine does not use

    @property
    def label(self) -> str:
        return self.name or (self.keys[0] if self.keys else "") or self.content[:30]

    def first_key(self, text: str) -> str | None:
        """The first of `keys` found in `text`."""
        return next((k for k in self.keys if key_in(k, text, self.case_sensitive, self.whole_words, self.regex)), None)

    def secondary_ok(self, text: str) -> tuple[bool, str]:
        """Whether the secondary keys agree with the logic, and how."""
        if not self.secondary_keys:
            return True, ""
        found = [k for k in self.secondary_keys if key_in(k, text, self.case_sensitive, self.whole_words, self.regex)]
        ok = {"and_any": bool(found), "and_all": len(found) == len(self.secondary_keys),
              "not_any": not found, "not_all": len(found) < len(self.secondary_keys)}[self.logic]
        how = f"secondary {self.logic.upper()}" + (f" ({', '.join(found)} found)" if found else " (none found)")
        return ok, how


_FIELD_TYPES = {"keys": list, "content": str, "priority": int, "enabled": bool, "case_sensitive": bool,
                "constant": bool, "name": str, "secondary_keys": list, "logic": str, "whole_words": bool,
                "position": str, "depth": int, "role": str, "probability": int, "group": str, "group_weight": int,
                "group_override": bool, "scan_depth": (int, type(None)), "exclude_recursion": bool,
                "prevent_recursion": bool, "regex": bool, "uid": str, "origin": str, "extra": dict}


def entry_from_dict(e, where: str) -> LoreEntry:
    """A stored entry (a story file's), every field checked."""
    if not isinstance(e, dict):
        raise LorebookError(f"{where}: a lorebook entry must be an object")
    unknown = set(e) - set(_FIELD_TYPES)
    if unknown:
        raise LorebookError(f"{where} has unknown field(s) {', '.join(sorted(unknown))}")
    for key, kind in _FIELD_TYPES.items():
        if key in e and not isinstance(e[key], kind) or (kind is int and isinstance(e.get(key), bool)):
            raise LorebookError(f"{where}: field {key!r} has the wrong type ({type(e[key]).__name__})")
    if "content" not in e or not all(isinstance(k, str) for k in e.get("keys", []) + e.get("secondary_keys", [])):
        raise LorebookError(f"{where} needs 'keys' (a list of text) and 'content' (text)")
    entry = LoreEntry(**{"keys": [], **e})
    _check_choices(entry, where)
    return entry


def _check_choices(entry: LoreEntry, where: str):
    for name, allowed in (("position", POSITIONS), ("logic", LOGICS), ("role", ROLES)):
        if getattr(entry, name) not in allowed:
            raise LorebookError(f"{where}: {name} must be one of {', '.join(allowed)}, got {getattr(entry, name)!r}")


# -- matching ---------------------------------------------------------------------------------

_REGEX_KEY = re.compile(r"^/(.+)/([imsux]*)$", re.S)


REGEX_SECONDS = 0.05  # a key's regular expression gets this long on one text (catastrophic patterns exist)


@lru_cache(maxsize=1024)
def _compiled(pattern: str, flags: int):
    try:
        return regex.compile(pattern, flags | regex.V0)
    except (regex.error, ValueError):
        return None  # not a valid expression: the key is plain text


def _search(pattern: str, flags: int, text: str) -> bool | None:
    compiled = _compiled(pattern, flags)
    if compiled is None:
        return None
    try:
        return compiled.search(text, timeout=REGEX_SECONDS) is not None
    except TimeoutError:
        return False


def key_in(key: str, text: str, case_sensitive: bool = False, whole_words: bool = False, regex_key: bool = False) -> bool:
    """Whether `key` occurs in `text`. A key written /pattern/flags is a regular expression, and
    so is every key with `regex_key`."""
    if not key:
        return False
    if regex_key:
        found = _search(key, 0 if case_sensitive else regex.I, text)
        if found is not None:
            return found
    m = _REGEX_KEY.match(key)
    if m:
        flags = sum({"i": regex.I, "m": regex.M, "s": regex.S, "u": 0, "x": regex.X}[f] for f in set(m.group(2)))
        found = _search(m.group(1), flags, text)
        if found is not None:
            return found
    if not case_sensitive:
        key, text = key.lower(), text.lower()
    if whole_words:
        return re.search(rf"(?<!\w){re.escape(key)}(?!\w)", text) is not None
    return key in text


# -- the engine -------------------------------------------------------------------------------


@dataclass
class Fired:
    entry: LoreEntry
    why: str  # what made it fire, or why it was left out
    tokens: int = 0


@dataclass
class Activation:
    placed: list[Fired] = field(default_factory=list)  # highest priority first
    left_out: list[Fired] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def at(self, *positions: str) -> list[Fired]:
        return [f for f in self.placed if f.entry.position in positions]


def activate(entries: list[LoreEntry], scan: Callable[[int | None], str], count: Callable[[str], int],
             budget: int, rng: random.Random | None = None, max_steps: int = MAX_STEPS) -> Activation:
    """Which entries go into the prompt (see the module docstring). `scan(depth)` is the recent
    text an entry searches (`depth` is its own scan_depth, None for the caller's default);
    `count(text)` measures tokens."""
    rng = rng or random.Random()
    result = Activation()
    fired: list[Fired] = []
    live = [e for e in entries if e.enabled and e.content.strip()]
    done: set[int] = set()

    def fire(entry: LoreEntry, why: str) -> bool:
        done.add(id(entry))
        if entry.probability < 100 and rng.random() * 100 >= entry.probability:
            result.left_out.append(Fired(entry, f"{why}, but its {entry.probability}% chance did not come up"))
            return False
        fired.append(Fired(entry, why))
        return True

    new: list[LoreEntry] = []
    for entry in live:
        if entry.constant:
            if fire(entry, "constant entry"):
                new.append(entry)
            continue
        text = scan(entry.scan_depth)
        key = entry.first_key(text)
        if key is None:
            continue
        ok, how = entry.secondary_ok(text)
        if ok and fire(entry, f'keyword "{key}" in the recent text' + (f", {how}" if how else "")):
            new.append(entry)
    for step in range(1, max_steps + 2):
        buffer = "\n".join(e.content for e in new if not e.prevent_recursion)
        if not buffer:
            break
        waiting = [e for e in live if id(e) not in done and not e.exclude_recursion and not e.constant]
        hits = []
        for entry in waiting:
            key = entry.first_key(buffer)
            if key is not None and entry.secondary_ok(buffer)[0]:
                source = next((e.label for e in new if not e.prevent_recursion
                               and key_in(key, e.content, entry.case_sensitive, entry.whole_words)), "the entries above")
                hits.append((entry, key, source))
        if step > max_steps:
            if hits:
                names = ", ".join(f"{s!r} -> {e.label!r}" for e, _, s in hits[:5])
                result.warnings.append(f"recursion stopped after {max_steps} steps: entries still trigger each other ({names})")
            break
        new = [e for e, key, source in hits if fire(e, f'keyword "{key}" in the entry {source!r} (recursion step {step})')]
    fired = _draw_groups(fired, result, rng)
    used = 0
    for f in sorted(fired, key=lambda f: -f.entry.priority):
        f.tokens = count(f.entry.content.strip())
        if used + f.tokens > budget:
            result.left_out.append(Fired(f.entry, f"{f.why}, priority {f.entry.priority}: left out, over the lore "
                                                  f"budget ({budget} tokens)", f.tokens))
            continue
        used += f.tokens
        f.why = f"{f.why}, priority {f.entry.priority}"
        result.placed.append(f)
    return result


def _draw_groups(fired: list[Fired], result: Activation, rng: random.Random) -> list[Fired]:
    """One entry per group: the override with the highest priority, else drawn by weight."""
    groups: dict[str, list[Fired]] = {}
    for f in fired:
        for g in (x.strip() for x in f.entry.group.split(",")):
            if g:
                groups.setdefault(g, []).append(f)
    losers: set[int] = set()
    for name, members in groups.items():
        members = [m for m in members if id(m) not in losers]
        if len(members) < 2:
            continue
        overrides = [m for m in members if m.entry.group_override]
        if overrides:
            winner, how = max(overrides, key=lambda m: m.entry.priority), "the group override"
        else:
            winner = rng.choices(members, weights=[max(m.entry.group_weight, 0) or 1 for m in members])[0]
            how = "the weighted draw"
        for m in members:
            if m is not winner:
                losers.add(id(m))
                result.left_out.append(Fired(m.entry, f"{m.why}, but group {name!r} keeps one entry: "
                                                      f"{winner.entry.label!r} won {how}"))
    return [f for f in fired if id(f) not in losers]


# -- formats ----------------------------------------------------------------------------------


def _keys(value) -> list[str]:
    if isinstance(value, str):
        return [k.strip() for k in value.split(",") if k.strip()]
    if isinstance(value, list):
        return [str(k) for k in value if str(k).strip()]
    return []


def _int(value, default: int) -> int:
    try:
        return int(value) if value is not None and value != "" else default
    except (TypeError, ValueError):
        return default


def _pick(table, value, default, what: str, where: str):
    """A SillyTavern number (or name) for one of `table`'s choices."""
    if value is None:
        return default
    if isinstance(value, str) and value.lower() in table:
        return value.lower()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= int(value) < len(table):
        return table[int(value)]
    raise LorebookError(f"{where}: unknown {what} {value!r}; known: {', '.join(table)} (or 0..{len(table) - 1})")


# SillyTavern World Info: entry field -> engine field, with its reader
_WI_FIELDS = ("key", "keysecondary", "content", "comment", "order", "disable", "constant", "selectiveLogic",
              "position", "depth", "role", "probability", "useProbability", "group", "groupWeight",
              "groupOverride", "scanDepth", "caseSensitive", "matchWholeWords", "excludeRecursion",
              "preventRecursion", "uid")


def from_world_info(data: dict, where: str) -> list[LoreEntry]:
    raw = data.get("entries")
    if not isinstance(raw, (dict, list)):
        raise LorebookError(f"{where}: a World Info file needs 'entries'")
    items = list(raw.items()) if isinstance(raw, dict) else [(str(i), e) for i, e in enumerate(raw)]
    out = []
    for uid, e in items:
        at = f"{where}: entry {uid}"
        if not isinstance(e, dict):
            raise LorebookError(f"{at} must be an object")
        if not isinstance(e.get("content", ""), str):
            raise LorebookError(f"{at}: 'content' must be text")
        use_probability = e.get("useProbability", True)
        entry = LoreEntry(
            keys=_keys(e.get("key")), content=e.get("content") or "", priority=_int(e.get("order"), 100),
            enabled=not e.get("disable", False), constant=bool(e.get("constant")), name=str(e.get("comment") or ""),
            secondary_keys=_keys(e.get("keysecondary")) if e.get("selective", True) is not False else [],
            logic=_pick(LOGICS, e.get("selectiveLogic"), "and_any", "selectiveLogic", at),
            position=_pick(POSITIONS, e.get("position"), "before_char", "position", at),
            depth=_int(e.get("depth"), 4), role=_pick(ROLES, e.get("role"), "system", "role", at),
            probability=_int(e.get("probability"), 100) if use_probability else 100,
            group=str(e.get("group") or ""), group_weight=_int(e.get("groupWeight"), 100),
            group_override=bool(e.get("groupOverride")),
            scan_depth=_int(e.get("scanDepth"), 0) if e.get("scanDepth") is not None else None,
            case_sensitive=bool(e.get("caseSensitive")), whole_words=bool(e.get("matchWholeWords")),
            exclude_recursion=bool(e.get("excludeRecursion")), prevent_recursion=bool(e.get("preventRecursion")),
            uid=str(e.get("uid", uid)), origin="world_info",
            extra={k: v for k, v in e.items() if k not in _WI_FIELDS},
        )
        if not use_probability:  # kept for the export; the engine ignores it
            entry.extra["probability"] = e.get("probability")
        if e.get("selective", True) is False:
            entry.extra["keysecondary"] = e.get("keysecondary", [])
        for unset in ("caseSensitive", "matchWholeWords"):  # null: SillyTavern's global setting, off here
            if unset in e and e[unset] is None:
                entry.extra[unset] = None
        out.append(entry)
    return out


def to_world_info(entries: list[LoreEntry]) -> dict:
    """SillyTavern World Info JSON: `entries` keyed by uid."""
    out = {}
    for i, e in enumerate(entries):
        uid = int(e.uid) if e.uid.isdecimal() else i
        while str(uid) in out:
            uid += 1
        extra = dict(e.extra) if e.origin == "world_info" else {}
        probability = extra.pop("probability", None)
        secondary = extra.pop("keysecondary", [])
        out[str(uid)] = {
            **extra, "uid": uid, "key": e.keys, "keysecondary": e.secondary_keys or secondary, "comment": e.name,
            "content": e.content, "constant": e.constant, "selective": extra.get("selective", True),
            "selectiveLogic": LOGICS.index(e.logic), "order": e.priority, "position": POSITIONS.index(e.position),
            "disable": not e.enabled, "depth": e.depth, "role": ROLES.index(e.role),
            "probability": e.probability if probability is None else probability,
            "useProbability": probability is None, "group": e.group, "groupOverride": e.group_override,
            "groupWeight": e.group_weight, "scanDepth": e.scan_depth,
            "caseSensitive": e.case_sensitive or (None if "caseSensitive" in extra else False),
            "matchWholeWords": e.whole_words or (None if "matchWholeWords" in extra else False), "excludeRecursion": e.exclude_recursion,
            "preventRecursion": e.prevent_recursion,
        }
    return {"entries": out}


# the character_book entry (V2/V3 spec), SillyTavern's fields in its `extensions`
_BOOK_FIELDS = ("keys", "secondary_keys", "content", "enabled", "insertion_order", "case_sensitive", "comment",
                "constant", "position", "selective", "id")


def from_character_book(book: dict, where: str) -> list[LoreEntry]:
    raw = book.get("entries", [])
    if not isinstance(raw, list):
        raise LorebookError(f"{where}: a character_book's 'entries' must be a list")
    out = []
    for i, e in enumerate(raw):
        at = f"{where}: character_book entry {i}"
        if not isinstance(e, dict):
            raise LorebookError(f"{at} must be an object")
        if not isinstance(e.get("content", ""), str):
            raise LorebookError(f"{at}: 'content' must be text")
        ext = e.get("extensions") if isinstance(e.get("extensions"), dict) else {}
        # SillyTavern writes its numeric position into extensions; the spec's own is before/after_char
        position = ext.get("position") if isinstance(ext.get("position"), int) else e.get("position") or "before_char"
        use_probability = ext.get("useProbability", True)
        out.append(LoreEntry(
            keys=_keys(e.get("keys")), content=e.get("content") or "", priority=_int(e.get("insertion_order"), 100),
            enabled=bool(e.get("enabled", True)),
            case_sensitive=bool(e.get("case_sensitive") if e.get("case_sensitive") is not None else ext.get("case_sensitive")),
            constant=bool(e.get("constant")), name=str(e.get("comment") or e.get("name") or ""),
            secondary_keys=_keys(e.get("secondary_keys")) if e.get("selective", True) else [],
            logic=_pick(LOGICS, ext.get("selectiveLogic"), "and_any", "selectiveLogic", at),
            position=_pick(POSITIONS, position, "before_char", "position", at),
            depth=_int(ext.get("depth"), 4), role=_pick(ROLES, ext.get("role"), "system", "role", at),
            probability=_int(ext.get("probability"), 100) if use_probability else 100,
            group=str(ext.get("group") or ""), group_weight=_int(ext.get("group_weight"), 100),
            group_override=bool(ext.get("group_override")),
            scan_depth=_int(ext.get("scan_depth"), 0) if ext.get("scan_depth") is not None else None,
            whole_words=bool(ext.get("match_whole_words")), exclude_recursion=bool(ext.get("exclude_recursion")),
            prevent_recursion=bool(ext.get("prevent_recursion")), regex=e.get("use_regex") is True,
            uid=str(e.get("id", i)), origin="character_book",
            extra={k: v for k, v in e.items() if k not in _BOOK_FIELDS},
        ))
    return out


def to_character_book(entries: list[LoreEntry], name: str = "") -> dict:
    """The card-embedded shape; SillyTavern's fields go into each entry's `extensions`."""
    out = []
    for i, e in enumerate(entries):
        extra = dict(e.extra) if e.origin == "character_book" else {}
        ext = extra.pop("extensions", None)
        ext = dict(ext) if isinstance(ext, dict) else {}
        ext.update({"position": POSITIONS.index(e.position), "selectiveLogic": LOGICS.index(e.logic),
                    "depth": e.depth, "role": ROLES.index(e.role), "probability": e.probability,
                    "useProbability": e.probability < 100, "group": e.group, "group_weight": e.group_weight,
                    "group_override": e.group_override, "scan_depth": e.scan_depth,
                    "match_whole_words": e.whole_words, "exclude_recursion": e.exclude_recursion,
                    "prevent_recursion": e.prevent_recursion, "case_sensitive": e.case_sensitive})
        out.append({**extra, "id": int(e.uid) if e.uid.isdecimal() else i, "keys": e.keys,
                    "secondary_keys": e.secondary_keys, "comment": e.name, "content": e.content,
                    "constant": e.constant, "selective": bool(e.secondary_keys), "insertion_order": e.priority,
                    "enabled": e.enabled, "position": "before_char" if e.position == "before_char" else "after_char",
                    **({"use_regex": True} if e.regex else {}),
                    "case_sensitive": e.case_sensitive, "extensions": ext})
    return {"name": name, "entries": out, "extensions": {}}


def from_novelai(data: dict, where: str) -> list[LoreEntry]:
    version = data.get("lorebookVersion")
    if isinstance(version, bool) or version not in NOVELAI_VERSIONS:
        raise LorebookError(f"{where}: NovelAI lorebookVersion {version!r} is not one this reads "
                            f"({NOVELAI_VERSIONS.start}-{NOVELAI_VERSIONS.stop - 1})")
    raw = data.get("entries")
    if not isinstance(raw, list):
        raise LorebookError(f"{where}: a NovelAI lorebook's 'entries' must be a list")
    out = []
    for i, e in enumerate(raw):
        at = f"{where}: entry {i}"
        if not isinstance(e, dict) or not isinstance(e.get("text", ""), str):
            raise LorebookError(f"{at} must be an object with 'text'")
        config = e.get("contextConfig") if isinstance(e.get("contextConfig"), dict) else {}
        out.append(LoreEntry(
            keys=_keys(e.get("keys")), content=e.get("text") or "", priority=_int(config.get("budgetPriority"), 400),
            enabled=bool(e.get("enabled", True)), constant=bool(e.get("forceActivation")),
            name=str(e.get("displayName") or ""), uid=str(e.get("id") or i), origin="novelai",
            extra={k: v for k, v in e.items() if k not in ("keys", "text", "enabled", "forceActivation", "displayName", "id")},
        ))
    return out


def to_novelai(entries: list[LoreEntry]) -> dict:
    out = []
    for e in entries:
        extra = dict(e.extra) if e.origin == "novelai" else {}
        own = extra.pop("contextConfig", None)
        config = {"prefix": "", "suffix": "\n", "tokenBudget": 1, "reservedTokens": 0, "trimDirection": "trimBottom",
                  "insertionType": "newline", "maximumTrimType": "sentence", "insertionPosition": -1,
                  **(own if isinstance(own, dict) else {}), "budgetPriority": e.priority}
        out.append({**extra, "text": e.content, "contextConfig": config, "displayName": e.name, "id": e.uid,
                    "keys": e.keys, "enabled": e.enabled, "forceActivation": e.constant})
    return {"lorebookVersion": 6, "entries": out, "settings": {"orderByKeyLocations": False}, "categories": []}


def read_entries(data, where: str) -> list[LoreEntry]:
    """Entries from any of the three shapes (told apart by their fields), or from a character
    card's embedded book."""
    if not isinstance(data, dict):
        raise LorebookError(f"{where}: a lorebook must be a JSON object")
    if "lorebookVersion" in data:
        return from_novelai(data, where)
    if isinstance(data.get("data"), dict):  # a whole card
        book = data["data"].get("character_book")
        return from_character_book(book, where) if isinstance(book, dict) else []
    entries = data.get("entries")
    if isinstance(entries, dict):
        return from_world_info(data, where)
    if isinstance(entries, list):
        if any(isinstance(e, dict) and "key" in e and "keys" not in e for e in entries):
            return from_world_info(data, where)
        return from_character_book(data, where)
    raise LorebookError(f"{where}: not a lorebook: no 'entries' (World Info, character_book) or 'lorebookVersion' (NovelAI)")


def write_entries(entries: list[LoreEntry], fmt: str, name: str = "") -> dict:
    """Entries as `world_info`, `character_book` or `novelai`."""
    if fmt == "world_info":
        return to_world_info(entries)
    if fmt == "character_book":
        return to_character_book(entries, name)
    if fmt == "novelai":
        return to_novelai(entries)
    raise LorebookError(f"unknown lorebook format {fmt!r}; use world_info, character_book or novelai")


def entries_to_dicts(entries: list[LoreEntry]) -> list[dict]:
    return [asdict(e) for e in entries]

