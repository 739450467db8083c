"""SillyTavern character cards (V2, "chara_card_v2") and world-info lorebooks, read as plain
JSON into neutral records that story mode and personas both use."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


class CardError(ValueError):
    pass


@dataclass
class LoreRecord:
    keys: list[str]
    content: str
    priority: int = 100
    enabled: bool = True
    case_sensitive: bool = False
    constant: bool = False  # always in context, keywords or not
    name: str = ""


@dataclass
class Card:
    name: str
    description: str = ""
    personality: str = ""
    scenario: str = ""
    first_message: str = ""
    example_dialogue: str = ""
    system_prompt: str = ""
    lore: list[LoreRecord] = field(default_factory=list)


def _entries(book) -> list[LoreRecord]:
    """Lore entries from a V2 character_book ({"entries": [...]}) or a world-info file
    ({"entries": {"0": {...}}})."""
    raw = book.get("entries", []) if isinstance(book, dict) else []
    items = raw.values() if isinstance(raw, dict) else raw
    out = []
    for e in items:
        if not isinstance(e, dict):
            continue
        keys = e.get("keys", e.get("key", []))
        if isinstance(keys, str):
            keys = [k.strip() for k in keys.split(",") if k.strip()]
        out.append(LoreRecord(
            keys=[str(k) for k in keys],
            content=str(e.get("content", "")),
            priority=int(e.get("priority", e.get("insertion_order", e.get("order", 100))) or 0),
            enabled=bool(e.get("enabled", not e.get("disable", False))),
            case_sensitive=bool(e.get("case_sensitive") or False),
            constant=bool(e.get("constant", False)),
            name=str(e.get("name", e.get("comment", ""))),
        ))
    return [r for r in out if r.content]


def read_card(path: str | Path) -> Card:
    """A V2 card, a V1 card (the same fields at the top level) or a bare world-info lorebook."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CardError(f"{path}: not a readable JSON card ({e}); PNG cards must be exported to JSON first") from None
    return card_from_dict(data, str(path), path.stem)


def card_from_dict(data, where: str, fallback_name: str = "lorebook") -> Card:
    """A card from its parsed JSON (a file's, or an upload's); `where` names it in errors."""
    if not isinstance(data, dict):
        raise CardError(f"{where}: a card must be a JSON object")
    if data.get("spec") == "chara_card_v2" or isinstance(data.get("data"), dict):
        d = data.get("data") or {}
    elif "entries" in data and "name" not in data:  # a lorebook alone
        return Card(name=fallback_name, lore=_entries(data))
    else:
        d = data
    if not d.get("name"):
        raise CardError(f"{where}: the card has no 'name'")
    return Card(
        name=str(d["name"]),
        description=str(d.get("description", "")),
        personality=str(d.get("personality", "")),
        scenario=str(d.get("scenario", "")),
        first_message=str(d.get("first_mes", "")),
        example_dialogue=str(d.get("mes_example", "")),
        system_prompt=str(d.get("system_prompt", "")),
        lore=_entries(d.get("character_book") or {}),
    )
