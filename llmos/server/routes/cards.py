"""Character cards and lorebooks over HTTP, as `llmos personas import/export` and `llmos story
import/lore-export` have them: import a card (JSON, PNG or CHARX, sent as base64 in JSON), list
the personas that came from cards, export one as a card, its picture; read and write lorebooks."""

from __future__ import annotations

import base64
import binascii

from fastapi import APIRouter, Body, Query
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from llmos.server.errors import APIError, not_found

router = APIRouter(tags=["Cards and lorebooks"])

MEDIA = {"json": "application/json", "png": "image/png", "charx": "application/zip"}
BINARY = {"schema": {"type": "string", "format": "binary"}}
IMAGE_MEDIA = {"png": "image/png", "jpeg": "image/jpeg", "jpg": "image/jpeg", "gif": "image/gif", "webp": "image/webp"}


class Upload(BaseModel):
    """A file sent as base64 (a PNG or CHARX card, or any card or lorebook file)."""

    model_config = ConfigDict(extra="forbid")

    file: str = Field(description="The file's bytes, base64-encoded.")
    filename: str = Field("upload", description="Its name, used in messages.")


class LorebookOut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    entries: list[dict] = Field(description="Lore entries, as POST /api/lorebooks/read returns them.")
    format: str = Field("world_info", description="world_info, character_book or novelai.")
    name: str = ""


def _upload(body: dict) -> tuple[bytes | dict, str]:
    """The card or lorebook in a request: an Upload, or the JSON object itself."""
    if set(body) <= {"file", "filename"} and "file" in body:
        try:
            upload = Upload(**body)
            return base64.b64decode(upload.file, validate=True), upload.filename
        except (binascii.Error, ValueError):
            raise APIError(400, "'file' must be the file's bytes in base64", "file") from None
    return body, "the uploaded card"


def _persona(name: str):
    from llmos.chat.personas import PersonaError, load_persona

    try:
        return load_persona(name)
    except PersonaError as e:
        raise not_found(str(e), "name") from None


@router.post("/api/personas/import")
def import_card(body: dict = Body(description="A character card (V1, V2 or V3 JSON), or {\"file\": base64, "
                                              "\"filename\"} for a PNG or CHARX card.")) -> dict:
    """Import a character card as a persona (`llmos personas import`): its picture, greetings,
    example dialogue, lorebook and every other field."""
    from llmos.cards import CardError, card_from_bytes, card_from_dict
    from llmos.chat.personas import PersonaError, import_card as save

    data, where = _upload(body)
    try:
        card = card_from_bytes(data, where) if isinstance(data, bytes) else card_from_dict(data, where)
        persona, path = save(card, where)
    except (CardError, PersonaError) as e:
        raise APIError(400, str(e), "card") from None
    return {"name": persona.name, "path": str(path), **_summary(persona)}


def _summary(persona) -> dict:
    data = persona.card.get("data", {}) if persona.card else {}
    return {"display_name": persona.display_name, "spec": persona.card.get("spec") if persona.card else None,
            "tags": data.get("tags") or [], "creator_notes": data.get("creator_notes") or "",
            "creator_notes_multilingual": data.get("creator_notes_multilingual") or {},
            "alternate_greetings": len(persona.alternate_greetings),
            "lore_entries": len((data.get("character_book") or {}).get("entries") or []),
            "picture": f"/api/personas/{persona.name}/picture" if persona.picture else None}


@router.get("/api/cards")
def list_cards() -> dict:
    """The personas that came from character cards, with their tags, notes and picture."""
    from llmos.chat.personas import PersonaError, list_personas, read_persona_file

    found = []
    for row in list_personas():
        try:
            p = read_persona_file(row["path"])
        except PersonaError:
            continue
        if p.card:
            found.append({"name": p.name, **_summary(p)})
    return {"cards": found}


@router.get("/api/personas/{name}/picture", response_class=Response,
            responses={200: {"content": {m: BINARY for m in ("image/png", "image/jpeg", "image/webp")}}})
def picture(name: str):
    """A persona's picture (a card's image)."""
    from llmos.chat.personas import picture_path

    path = picture_path(_persona(name))
    if path is None:
        raise not_found(f"persona {name!r} has no picture", "name")
    return Response(path.read_bytes(), media_type=IMAGE_MEDIA.get(path.suffix.lstrip("."), "application/octet-stream"))


@router.get("/api/personas/{name}/card", response_class=Response,
            responses={200: {"content": {m: BINARY for m in MEDIA.values()}}})
def export_card(name: str, format: str = Query("png", description="json, png or charx")):
    """A persona as a character card file (`llmos personas export`): the card it came from,
    unchanged; a PNG holds both the `chara` (V2) and `ccv3` (V3) chunks."""
    from llmos.cards import CardError, export_card as export
    from llmos.chat.personas import PersonaError, card_of

    if format not in MEDIA:
        raise APIError(400, "format must be json, png or charx", "format")
    try:
        card = card_of(_persona(name))
        data = export(card, format, card.image)
    except (CardError, PersonaError) as e:
        raise APIError(400, str(e), "name") from None
    return Response(data, media_type=MEDIA[format],
                    headers={"Content-Disposition": f'attachment; filename="{name}.{format}"'})


@router.post("/api/lorebooks/read")
def read_lorebook(body: dict = Body(description="A lorebook (World Info, character_book or NovelAI) or a card, as "
                                                "JSON, or {\"file\": base64, \"filename\"}.")) -> dict:
    """The lore entries of a lorebook file or of a card's book, in the engine's fields (the
    studio's Lorebook import)."""
    from llmos.cards import CardError, card_from_bytes
    from llmos.writing.lorebook import LorebookError, entries_to_dicts, read_entries

    data, where = _upload(body)
    try:
        if isinstance(data, bytes):
            card = card_from_bytes(data, where)
            data = card.book or {"entries": []}
        entries = read_entries(data, where)
    except (CardError, LorebookError) as e:
        raise APIError(400, str(e), "file") from None
    return {"entries": entries_to_dicts(entries)}


@router.post("/api/lorebooks/write", response_class=Response,
             responses={200: {"content": {"application/json": {"schema": {"type": "object"}}}}})
def write_lorebook(body: LorebookOut):
    """Lore entries as a SillyTavern World Info, character_book or NovelAI file."""
    import json

    from llmos.writing.lorebook import LorebookError, entry_from_dict, write_entries

    try:
        entries = [entry_from_dict(e, f"entry {i}") for i, e in enumerate(body.entries)]
        data = write_entries(entries, body.format, body.name)
    except LorebookError as e:
        raise APIError(400, str(e), "entries" if "entry" in str(e) else "format") from None
    suffix = "lorebook" if body.format == "novelai" else "json"
    return Response(json.dumps(data, ensure_ascii=False, indent=2), media_type="application/json",
                    headers={"Content-Disposition": f'attachment; filename="lorebook.{suffix}"'})
