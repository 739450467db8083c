"""Personas: who the model plays in a chat. YAML or JSON files in $LLMOS_HOME/personas, a few
built in, and SillyTavern character cards imported as personas."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from llmos.settings import llmos_home

BUILTIN_DIR = Path(__file__).parent / "personas"
STRATEGIES = ("farewell", "topic_guard", "handover", "faq")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class PersonaError(ValueError):
    """A persona is missing or malformed; the message names the file and the field."""


@dataclass
class Persona:
    name: str
    description: str
    style: str = ""
    greeting: str = ""
    alternate_greetings: list[str] = field(default_factory=list)  # other first messages to pick or swipe
    language: str = "en"
    examples: list[dict] = field(default_factory=list)  # [{"user": ..., "assistant": ...}]
    strategies: dict = field(default_factory=dict)
    instructions: str = ""  # a card's system prompt: first in the system message
    post_history: str = ""  # a card's post_history_instructions: after the history, before the reply
    card: dict = field(default_factory=dict)  # the whole character card it came from, for export and its lorebook
    picture: str = ""  # the card's picture, a file beside the persona's
    source: str = ""  # where it was read from

    @property
    def display_name(self) -> str:
        return str(self.card.get("data", {}).get("name") or self.name) if self.card else self.name

    def system_prompt(self) -> str:
        parts = [self.instructions.replace("{{original}}", "").strip()] if self.instructions.strip() else []
        parts.append(f"You are {self.display_name}. {self.description}".strip())
        if self.style:
            parts.append(f"Speaking style: {self.style}")
        if self.language.startswith("zh"):
            parts.append("Reply in Chinese.")
        return "\n".join(parts)

    def example_messages(self) -> list[dict]:
        out = []
        for ex in self.examples:
            out += [{"role": "user", "content": ex["user"]}, {"role": "assistant", "content": ex["assistant"]}]
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("source")
        return d


# field -> (type, required)
_FIELDS = {
    "name": (str, True), "description": (str, True), "style": (str, False), "greeting": (str, False),
    "alternate_greetings": (list, False), "language": (str, False), "examples": (list, False), "strategies": (dict, False),
    "instructions": (str, False), "post_history": (str, False), "card": (dict, False), "picture": (str, False),
}


def persona_from_dict(data, where: str) -> Persona:
    """Validate a persona record; every problem names its field."""
    if not isinstance(data, dict):
        raise PersonaError(f"{where}: a persona must be a mapping of fields, got {type(data).__name__}")
    for key, (kind, required) in _FIELDS.items():
        if key not in data or data[key] is None:
            if required:
                raise PersonaError(f"{where}: the required field '{key}' is missing")
            continue
        if not isinstance(data[key], kind):
            raise PersonaError(f"{where}: field '{key}' must be a {kind.__name__}, got {type(data[key]).__name__}")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise PersonaError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(_FIELDS)}")
    if not NAME_RE.match(data["name"]):
        raise PersonaError(f"{where}: field 'name' must be letters, digits, '-', '_' or '.', got {data['name']!r}")
    for i, g in enumerate(data.get("alternate_greetings") or []):
        if not isinstance(g, str):
            raise PersonaError(f"{where}: alternate_greetings[{i}] must be a string, got {type(g).__name__}")
    for i, ex in enumerate(data.get("examples") or []):
        if not (isinstance(ex, dict) and isinstance(ex.get("user"), str) and isinstance(ex.get("assistant"), str)):
            raise PersonaError(f"{where}: examples[{i}] must have string fields 'user' and 'assistant'")
    strategies = data.get("strategies") or {}
    for key, value in strategies.items():
        if key not in STRATEGIES:
            raise PersonaError(f"{where}: unknown strategy '{key}'; known: {', '.join(STRATEGIES)}")
        if not isinstance(value, dict):
            raise PersonaError(f"{where}: strategies.{key} must be a mapping, got {type(value).__name__}")
        reply = value.get("reply")
        if reply is not None and not (isinstance(reply, str) or (isinstance(reply, dict) and all(isinstance(v, str) for v in reply.values()))):
            raise PersonaError(f"{where}: strategies.{key}.reply must be a string or a mapping of language to string")
        for words in ("allow", "deny"):
            if words in value and not (isinstance(value[words], list) and all(isinstance(w, str) for w in value[words])):
                raise PersonaError(f"{where}: strategies.{key}.{words} must be a list of strings")
        for number in ("after_unhappy", "threshold"):
            if number in value and not isinstance(value[number], (int, float)):
                raise PersonaError(f"{where}: strategies.{key}.{number} must be a number")
    return Persona(**{k: v for k, v in data.items() if v is not None}, source=where)


def read_persona_file(path: str | Path) -> Persona:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PersonaError(f"{path}: cannot read the persona file ({e})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise PersonaError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({e})") from None
    return persona_from_dict(data, str(path))


def personas_dir() -> Path:
    return llmos_home() / "personas"


def _files() -> dict[str, Path]:
    """name -> file; the user's personas shadow built-in ones of the same name."""
    found = {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.yaml"))}
    if personas_dir().is_dir():
        for p in sorted(personas_dir().iterdir()):
            if p.suffix in (".yaml", ".yml", ".json"):
                found[p.stem] = p
    return found


def list_personas() -> list[dict]:
    rows = []
    for name, path in _files().items():
        try:
            p = read_persona_file(path)
            rows.append({"name": p.name, "description": p.description, "builtin": path.parent == BUILTIN_DIR, "path": str(path),
                         "card": p.card.get("spec") if p.card else None,
                         "tags": (p.card.get("data", {}).get("tags") or []) if p.card else []})
        except PersonaError as e:
            rows.append({"name": name, "description": f"(invalid: {e})", "builtin": False, "path": str(path),
                         "card": None, "tags": []})
    return rows


def load_persona(name_or_path: str | None) -> Persona:
    """A persona by name (user's or built-in) or by file path."""
    name = name_or_path or "assistant"
    path = Path(name).expanduser()
    if path.suffix in (".yaml", ".yml", ".json") and path.exists():
        return read_persona_file(path)
    files = _files()
    if name not in files:
        raise PersonaError(f"unknown persona {name!r}. Known: {', '.join(files)}. Add one as YAML or JSON in "
                           f"{personas_dir()} or import a character card with `llmos personas import CARD.json`")
    return read_persona_file(files[name])


def persona_from_card(card_path: str | Path) -> Persona:
    """A character card file (JSON, PNG or CHARX; V1, V2 or V3) as a persona."""
    from llmos.cards import read_card

    return persona_from_card_data(read_card(card_path), str(card_path))


def persona_from_card_data(card, where: str) -> Persona:
    """A parsed character card (llmos.cards.Card) as a persona; the whole card rides along in
    `card`, so nothing of it is lost and an export gives it back."""
    from llmos.cards import fill_macros

    if card.is_lorebook:
        raise PersonaError(f"{where}: this is a lorebook, not a character card; import it into a story "
                           f"(`llmos story import`) or a card")
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", card.name).strip("-") or "character"
    fill = lambda s: fill_macros(s, card.name).strip()  # noqa: E731
    description = "\n".join(x for x in (card.description, card.personality and f"Personality: {card.personality}",
                                        card.scenario and f"Scenario: {card.scenario}") if x)
    data = {"name": slug[:64], "description": fill(description) or card.name, "greeting": fill(card.first_message),
            "alternate_greetings": [fill(g) for g in card.alternate_greetings if g.strip()], "language": "en",
            "examples": example_dialogue(card.example_dialogue, card.name), "strategies": {"farewell": {}},
            "instructions": fill(card.system_prompt), "post_history": fill(card.post_history_instructions),
            "card": card.raw}
    persona = persona_from_dict(data, where)
    persona_lore(persona)  # a lorebook that cannot be read is refused now, not at the first message
    return persona


def import_card(card, where: str) -> tuple[Persona, Path]:
    """A parsed card saved as a persona, with its picture."""
    persona = persona_from_card_data(card, where)
    path = save_persona(persona, card.image, card.image_ext)
    archive = path.with_suffix(".charx")  # a CHARX card's zip, for its other assets on export
    if card.archive:
        tmp = archive.with_name(archive.name + ".tmp")
        tmp.write_bytes(card.archive)
        tmp.replace(archive)
    else:
        archive.unlink(missing_ok=True)
    return persona, path


def example_dialogue(text: str, char: str) -> list[dict]:
    """mes_example blocks ("<START>", then "{{user}}: ..." and "{{char}}: ..." lines) as example
    exchanges, macros filled in."""
    from llmos.cards import fill_macros

    user_re = re.compile(r"\{\{user\}\}|<USER>", re.I)
    examples = []
    for block in re.split(r"<START>", text, flags=re.I):
        lines = re.findall(r"^([^:\n]{1,60}):[ \t]*(.*(?:\n(?![^:\n]{1,60}:).*)*)", block.strip(), re.M)
        pending = None
        for speaker, said in lines:
            said = fill_macros(said, char).strip()
            if user_re.fullmatch(speaker.strip()):
                pending = said
            elif pending:
                examples.append({"user": pending, "assistant": said})
                pending = None
    return examples


def save_persona(persona: Persona, image: bytes | None = None, image_ext: str = "png") -> Path:
    """Write a persona into $LLMOS_HOME/personas as YAML (atomically), a card's picture beside it."""
    personas_dir().mkdir(parents=True, exist_ok=True)
    if image:
        picture = personas_dir() / f"{persona.name}.{image_ext}"
        tmp = picture.with_name(picture.name + ".tmp")
        tmp.write_bytes(image)
        tmp.replace(picture)
        persona.picture = picture.name
    out = personas_dir() / f"{persona.name}.yaml"
    tmp = out.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(persona.to_dict(), allow_unicode=True, sort_keys=False), encoding="utf-8")
    tmp.replace(out)
    return out


def picture_path(persona: Persona) -> Path | None:
    """The persona's picture file, if it has one."""
    if not persona.picture or "/" in persona.picture or "\\" in persona.picture:
        return None
    path = (Path(persona.source).parent if persona.source and Path(persona.source).exists() else personas_dir()) / persona.picture
    return path if path.is_file() else None


def card_of(persona: Persona):
    """The character card a persona exports as: the card it came from, unchanged, or one written
    from its fields (a persona of ours becomes a V2 card), with its picture."""
    from llmos.cards import card_from_dict

    if persona.card:
        card = card_from_dict(persona.card, persona.name)
    else:
        examples = "\n".join(f"<START>\n{{{{user}}}}: {ex['user']}\n{{{{char}}}}: {ex['assistant']}" for ex in persona.examples)
        raw = {"spec": "chara_card_v2", "spec_version": "2.0", "data": {
            "name": persona.name, "description": persona.description, "personality": persona.style, "scenario": "",
            "first_mes": persona.greeting, "mes_example": examples, "creator_notes": "", "system_prompt": persona.instructions,
            "post_history_instructions": persona.post_history, "alternate_greetings": persona.alternate_greetings,
            "tags": [], "creator": "", "character_version": "", "extensions": {"llmos": {"language": persona.language}}}}
        card = card_from_dict(raw, persona.name)
    path = picture_path(persona)
    card.image = path.read_bytes() if path else None
    source = Path(persona.source) if persona.source else None
    if persona.card and source is not None and source.with_suffix(".charx").is_file():
        card.archive = source.with_suffix(".charx").read_bytes()
    return card


def persona_lore(persona: Persona):
    """The persona's lorebook (its card's character_book) as engine entries, and the book's own
    settings: (entries, scan_depth, token_budget, recursive)."""
    from llmos.writing.lorebook import LorebookError, from_character_book

    book = persona.card.get("data", {}).get("character_book") if persona.card else None
    if not isinstance(book, dict):
        return [], None, None, True
    try:
        entries = from_character_book(book, persona.name)
    except LorebookError as e:
        raise PersonaError(str(e)) from None
    number = lambda v: v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None  # noqa: E731
    return entries, number(book.get("scan_depth")), number(book.get("token_budget")), book.get("recursive_scanning") is not False
