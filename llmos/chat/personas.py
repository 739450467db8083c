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
    source: str = ""  # where it was read from

    def system_prompt(self) -> str:
        parts = [f"You are {self.name}. {self.description}".strip()]
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
            rows.append({"name": p.name, "description": p.description, "builtin": path.parent == BUILTIN_DIR, "path": str(path)})
        except PersonaError as e:
            rows.append({"name": name, "description": f"(invalid: {e})", "builtin": False, "path": str(path)})
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
    """A SillyTavern V2 (or V1) character card file as a persona."""
    from llmos.cards import read_card

    return persona_from_card_data(read_card(card_path), str(card_path))


def persona_from_card_data(card, where: str) -> Persona:
    """A parsed character card (llmos.cards.Card) as a persona."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", card.name).strip("-") or "character"
    description = "\n".join(x for x in (card.description, card.personality and f"Personality: {card.personality}",
                                        card.scenario and f"Scenario: {card.scenario}") if x)
    examples = []
    # mes_example blocks: "<START>\n{{user}}: ...\n{{char}}: ..."
    for block in re.split(r"<START>", card.example_dialogue):
        user = re.search(r"\{\{user\}\}:\s*(.+?)(?=\n\{\{char\}\}:|\Z)", block, re.S)
        char = re.search(r"\{\{char\}\}:\s*(.+?)(?=\n\{\{user\}\}:|\Z)", block, re.S)
        if user and char:
            examples.append({"user": user.group(1).strip(), "assistant": char.group(1).strip()})
    fill = lambda s: s.replace("{{char}}", card.name).replace("{{user}}", "you")  # noqa: E731
    data = {"name": slug[:64], "description": fill(description) or card.name, "style": fill(card.system_prompt),
            "greeting": fill(card.first_message), "language": "en",
            "examples": [{k: fill(v) for k, v in ex.items()} for ex in examples],
            "strategies": {"farewell": {}}}
    return persona_from_dict(data, where)


def save_persona(persona: Persona) -> Path:
    """Write a persona into $LLMOS_HOME/personas as YAML (atomically)."""
    personas_dir().mkdir(parents=True, exist_ok=True)
    out = personas_dir() / f"{persona.name}.yaml"
    tmp = out.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(persona.to_dict(), allow_unicode=True, sort_keys=False), encoding="utf-8")
    tmp.replace(out)
    return out
