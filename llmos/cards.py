"""Character cards (V1, V2 "chara_card_v2", V3 "chara_card_v3") in the three files they travel
in: JSON, PNG (base64 JSON in a tEXt chunk: `chara` for V2, `ccv3` for V3, preferred when both
are there) and CHARX (a zip with `card.json` and its assets). Lorebooks (world info) read here
stay raw: llmos/writing/lorebook.py turns them into entries of the one lorebook engine.

A card keeps its whole original object, so an import followed by an export gives back the same
card, unknown `extensions` and fields included. Limits: 20 MB a file, 1 MB a text field.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

MAX_FILE = 20 * 1024 * 1024
MAX_FIELD = 1024 * 1024
MAX_ASSETS = 200 * 1024 * 1024  # a CHARX's assets, unpacked
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
V1_FIELDS = ("name", "description", "personality", "scenario", "first_mes", "mes_example")
IMAGE_TYPES = {b"\x89PNG": "png", b"\xff\xd8\xff": "jpeg", b"GIF8": "gif", b"RIFF": "webp"}


class CardError(ValueError):
    pass


@dataclass
class Card:
    name: str
    description: str = ""
    personality: str = ""
    scenario: str = ""
    first_message: str = ""
    alternate_greetings: list[str] = field(default_factory=list)
    example_dialogue: str = ""
    system_prompt: str = ""
    post_history_instructions: str = ""
    tags: list[str] = field(default_factory=list)
    creator_notes: str = ""
    creator_notes_multilingual: dict = field(default_factory=dict)  # V3: language code -> notes
    book: dict | None = None  # the embedded character_book, or the lorebook file itself, raw
    raw: dict = field(default_factory=dict)  # the whole card object as read (V1 wrapped as V2)
    image: bytes | None = None  # the picture (a PNG card's image, a CHARX icon)
    image_ext: str = "png"
    archive: bytes | None = None  # a CHARX card's zip, whose other assets an export keeps
    is_lorebook: bool = False  # a world-info or NovelAI lorebook file, no character

    @property
    def spec(self) -> str:
        return self.raw.get("spec", "")


_MACROS = re.compile(r"\{\{(char|user)\}\}|<(BOT|USER)>", re.I)


def fill_macros(text: str, char: str, user: str = "you") -> str:
    """{{char}} and {{user}} (any case), and V1's <BOT> and <USER>, filled in."""
    return _MACROS.sub(lambda m: char if (m.group(1) or m.group(2)).lower() in ("char", "bot") else user, text)


# -- reading ----------------------------------------------------------------------------------


def read_card(path: str | Path) -> Card:
    """A card from a .json, .png or .charx file (or a bare lorebook JSON file)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE:
            raise CardError(f"{path}: {size / 1e6:.1f} MB is over the {MAX_FILE // 2**20} MB limit for a card")
        data = path.read_bytes()
    except OSError as e:
        raise CardError(f"{path}: cannot read the card ({e.strerror or e})") from None
    return card_from_bytes(data, str(path), path.stem)


def card_from_bytes(data: bytes, where: str, fallback_name: str = "lorebook") -> Card:
    """A card from a file's bytes, whatever its format (told by its first bytes)."""
    if len(data) > MAX_FILE:
        raise CardError(f"{where}: {len(data) / 1e6:.1f} MB is over the {MAX_FILE // 2**20} MB limit for a card")
    if data.startswith(PNG_SIGNATURE):
        return card_from_png(data, where)
    if data.startswith(b"PK\x03\x04"):
        return card_from_charx(data, where)
    try:
        obj = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CardError(f"{where}: not a card: neither a PNG, a CHARX zip nor JSON ({e})") from None
    return card_from_dict(obj, where, fallback_name)


def card_from_dict(data, where: str, fallback_name: str = "lorebook") -> Card:
    """A card from its parsed JSON (a file's, or an upload's); `where` names it in errors."""
    if not isinstance(data, dict):
        raise CardError(f"{where}: a card must be a JSON object, got {type(data).__name__}")
    _check_sizes(data, where)
    spec = data.get("spec")
    if spec in ("chara_card_v2", "chara_card_v3") or isinstance(data.get("data"), dict):
        if spec not in (None, "chara_card_v2", "chara_card_v3"):
            raise CardError(f"{where}: unknown card spec {spec!r}; known: chara_card_v2, chara_card_v3")
        raw, d = data, data.get("data")
        if not isinstance(d, dict):
            raise CardError(f"{where}: the card's 'data' must be an object")
    elif "lorebookVersion" in data or ("entries" in data and not any(k in data for k in V1_FIELDS[1:])):
        return Card(name=str(data.get("name") or fallback_name), book=data, raw=data, is_lorebook=True)
    else:  # V1: the fields at the top level; kept as V2 so that it exports as a current card
        d = {k: data.get(k, "") for k in V1_FIELDS}
        d.update({k: v for k, v in data.items() if k not in V1_FIELDS})
        raw = {"spec": "chara_card_v2", "spec_version": "2.0", "data": d}
    if not isinstance(d.get("name"), str) or not d["name"].strip():
        raise CardError(f"{where}: the card has no 'name'")
    text = {}
    for key in ("description", "personality", "scenario", "first_mes", "mes_example", "system_prompt",
                "post_history_instructions", "creator_notes"):
        value = d.get(key, "")
        if value is not None and not isinstance(value, str):
            raise CardError(f"{where}: field '{key}' must be text, got {type(value).__name__}")
        text[key] = value or ""
    lists = {}
    for key in ("alternate_greetings", "tags"):
        value = d.get(key) or []
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise CardError(f"{where}: field '{key}' must be a list of strings")
        lists[key] = value
    notes = d.get("creator_notes_multilingual") or {}
    if not (isinstance(notes, dict) and all(isinstance(v, str) for v in notes.values())):
        raise CardError(f"{where}: field 'creator_notes_multilingual' must map language codes to text")
    book = d.get("character_book")
    if book is not None and not (isinstance(book, dict) and isinstance(book.get("entries", []), list)):
        raise CardError(f"{where}: 'character_book' must be an object with a list of 'entries'")
    return Card(
        name=d["name"].strip(), description=text["description"], personality=text["personality"],
        scenario=text["scenario"], first_message=text["first_mes"], alternate_greetings=lists["alternate_greetings"],
        example_dialogue=text["mes_example"], system_prompt=text["system_prompt"],
        post_history_instructions=text["post_history_instructions"], tags=lists["tags"],
        creator_notes=text["creator_notes"], creator_notes_multilingual=notes, book=book or None, raw=raw,
    )


def _check_sizes(obj, where: str):
    """Every text field under the limit (a megabyte of 'description' is an attack, not a character)."""
    stack = [("card", obj)]
    while stack:  # not recursive: a deeply nested upload must not exhaust the stack
        path, value = stack.pop()
        if isinstance(value, str) and len(value) > MAX_FIELD:
            raise CardError(f"{where}: {path} is {len(value) / 1e6:.1f} MB of text; the limit is {MAX_FIELD // 2**20} MB a field")
        if isinstance(value, dict):
            stack += [(f"{path}.{k}", v) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(f"{path}[{i}]", v) for i, v in enumerate(value)]


# -- PNG --------------------------------------------------------------------------------------


def png_chunks(data: bytes, where: str = "the PNG") -> list[tuple[bytes, bytes]]:
    """(type, payload) of every chunk, CRCs checked."""
    if not data.startswith(PNG_SIGNATURE):
        raise CardError(f"{where}: not a PNG file")
    chunks, at = [], len(PNG_SIGNATURE)
    while at < len(data):
        if at + 8 > len(data):
            raise CardError(f"{where}: the PNG is cut short")
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        body = data[at + 8:at + 8 + length]
        crc = data[at + 8 + length:at + 12 + length]
        if len(body) < length or len(crc) < 4:
            raise CardError(f"{where}: the PNG is cut short in its {kind.decode('latin-1')!r} chunk")
        if struct.unpack(">I", crc)[0] != zlib.crc32(kind + body):
            raise CardError(f"{where}: the {kind.decode('latin-1')!r} chunk has a wrong CRC: the file is damaged")
        chunks.append((kind, body))
        at += 12 + length
        if kind == b"IEND":
            break
    if not chunks or chunks[0][0] != b"IHDR" or chunks[-1][0] != b"IEND":
        raise CardError(f"{where}: not a complete PNG (it needs IHDR first and IEND last)")
    return chunks


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_from_chunks(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return PNG_SIGNATURE + b"".join(_chunk(k, b) for k, b in chunks)


def text_chunks(chunks) -> dict[str, str]:
    """tEXt chunks: keyword -> text (Latin-1, as the PNG specification has it)."""
    found = {}
    for kind, body in chunks:
        if kind == b"tEXt" and b"\0" in body:
            key, _, text = body.partition(b"\0")
            found[key.decode("latin-1")] = text.decode("latin-1")
    return found


def card_from_png(data: bytes, where: str) -> Card:
    chunks = png_chunks(data, where)
    texts = text_chunks(chunks)
    if "ccv3" not in texts and "chara" not in texts:
        raise CardError(f"{where}: this PNG holds no character card (no 'chara' or 'ccv3' text chunk)")
    found = {key: _chunk_json(texts[key], key, where) for key in ("ccv3", "chara") if key in texts}
    obj = found.get("ccv3", found.get("chara"))
    chara = found.get("chara")
    if isinstance(chara, dict) and isinstance(chara.get("data"), dict) and "group_only_greetings" not in chara["data"] \
            and as_v3(chara) == obj:  # the V3 chunk only restates a V2 card (as card_png writes it): the card is V2
        obj = chara
    card = card_from_dict(obj, where)
    card.image = png_from_chunks([(k, b) for k, b in chunks if not (k == b"tEXt" and b.split(b"\0")[0] in (b"chara", b"ccv3"))])
    card.image_ext = "png"
    return card


def _chunk_json(text: str, key: str, where: str):
    try:
        return json.loads(base64.b64decode(text, validate=True).decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, json.JSONDecodeError, ValueError):
        raise CardError(f"{where}: the PNG's '{key}' chunk is not base64-encoded JSON") from None


def blank_png(width: int = 64, height: int = 64, rgb: tuple[int, int, int] = (96, 96, 128)) -> bytes:
    """A small valid PNG of one colour: the picture of a card that has none."""
    row = b"\0" + bytes(rgb) * width  # filter type 0, then the pixels
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return png_from_chunks([(b"IHDR", ihdr), (b"IDAT", zlib.compress(row * height)), (b"IEND", b"")])


def card_png(card: Card, image: bytes | None = None) -> bytes:
    """The card in a PNG: both chunks, `chara` (V2) and `ccv3` (V3), as the reference tools write
    them, in `image` (a PNG; any card chunks it holds are replaced) or a blank picture."""
    if image is None or not image.startswith(PNG_SIGNATURE):
        image = blank_png()
    chunks = [(k, b) for k, b in png_chunks(image, "the picture")
              if not (k == b"tEXt" and b.split(b"\0")[0] in (b"chara", b"ccv3"))]
    v2, v3 = as_v2(card.raw), as_v3(card.raw)
    texts = [(b"tEXt", b"chara\0" + base64.b64encode(_json(v2))), (b"tEXt", b"ccv3\0" + base64.b64encode(_json(v3)))]
    return png_from_chunks(chunks[:-1] + texts + chunks[-1:])


def _json(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def as_v2(raw: dict) -> dict:
    """The card as V2 (a V3 card's data is kept whole: V2 readers skip what they do not know)."""
    return {**raw, "spec": "chara_card_v2", "spec_version": "2.0"} if raw.get("spec") != "chara_card_v2" else raw


def as_v3(raw: dict) -> dict:
    """The card as V3: a V2 card gains the fields V3 requires."""
    if raw.get("spec") == "chara_card_v3":
        return raw
    data = {"group_only_greetings": [], **raw.get("data", {})}
    return {**raw, "spec": "chara_card_v3", "spec_version": "3.0", "data": data}


# -- CHARX ------------------------------------------------------------------------------------


def card_from_charx(data: bytes, where: str) -> Card:
    """A CHARX zip: `card.json` (V3) and its assets; the icon becomes the card's picture."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            names = set(z.namelist())
            if "card.json" not in names:
                raise CardError(f"{where}: this zip holds no card.json: not a CHARX card")
            info = z.getinfo("card.json")
            if info.file_size > MAX_FILE:
                raise CardError(f"{where}: its card.json is over the {MAX_FILE // 2**20} MB limit")
            try:
                obj = json.loads(z.read("card.json").decode("utf-8-sig"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CardError(f"{where}: its card.json is not valid JSON ({e})") from None
            card = card_from_dict(obj, where)
            if sum(i.file_size for i in z.infolist()) > MAX_ASSETS:
                raise CardError(f"{where}: its assets unpack to over {MAX_ASSETS // 2**20} MB")
            card.archive = data
            icon = _icon_asset(card.raw, names)
            if icon and z.getinfo(icon).file_size <= MAX_FILE:
                card.image = z.read(icon)
                card.image_ext = image_ext(card.image)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise CardError(f"{where}: a damaged CHARX zip ({e})") from None
    return card


def _icon_asset(raw: dict, names: set[str]) -> str | None:
    assets = raw.get("data", {}).get("assets") or []
    icons = [a for a in assets if isinstance(a, dict) and a.get("type") == "icon" and str(a.get("uri", "")).startswith("embeded://")]
    icons.sort(key=lambda a: a.get("name") != "main")
    for a in icons:
        path = a["uri"][len("embeded://"):]
        if path in names:
            return path
    return None


def image_ext(image: bytes) -> str:
    return next((ext for magic, ext in IMAGE_TYPES.items() if image.startswith(magic)), "png")


def card_charx(card: Card, image: bytes | None = None) -> bytes:
    """The card as CHARX: card.json (V3) and its picture as the main icon; a card read from a
    CHARX keeps every asset of its zip."""
    if card.archive:
        buf = io.BytesIO()
        with zipfile.ZipFile(io.BytesIO(card.archive)) as old, zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("card.json", _json(as_v3(card.raw)))
            for info in old.infolist():
                if info.filename != "card.json":
                    z.writestr(info, old.read(info))
        return buf.getvalue()
    raw = as_v3(card.raw)
    image = image or blank_png()
    ext = image_ext(image)
    assets = raw["data"].get("assets")
    icon = _icon_asset(raw, {a["uri"][len("embeded://"):] for a in assets or [] if isinstance(a, dict)
                             and str(a.get("uri", "")).startswith("embeded://")})
    if icon is None:  # the picture needs an entry that points at it
        icon = f"assets/icon/images/main.{ext}"
        entry = {"type": "icon", "uri": f"embeded://{icon}", "name": "main", "ext": ext}
        kept = [a for a in assets or [] if not (isinstance(a, dict) and a.get("type") == "icon" and a.get("name") == "main")]
        raw = {**raw, "data": {**raw["data"], "assets": [entry, *kept]}}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("card.json", _json(raw))
        z.writestr(icon, image)
    return buf.getvalue()


def card_json(card: Card) -> bytes:
    return json.dumps(card.raw, ensure_ascii=False, indent=2).encode("utf-8")


def export_card(card: Card, fmt: str, image: bytes | None = None) -> bytes:
    """The card as `json`, `png` or `charx` bytes."""
    if fmt == "json":
        return card_json(card)
    if fmt == "png":
        return card_png(card, image)
    if fmt == "charx":
        return card_charx(card, image)
    raise CardError(f"unknown card format {fmt!r}; use json, png or charx")
