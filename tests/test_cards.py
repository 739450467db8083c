"""Character cards V1, V2 and V3 as JSON, PNG (tEXt chunks `chara` and `ccv3`) and CHARX: every
field reaches the persona, an import then an export gives the same card, bad files are one-line
errors with nothing half-imported; over the CLI and HTTP too."""

import base64
import copy
import io
import json
import shutil
import struct
import zipfile
import zlib

import httpx
import pytest
from typer.testing import CliRunner

from llmos.cards import (MAX_FIELD, CardError, as_v2, blank_png, card_from_bytes, card_from_dict, card_png,
                         export_card, png_chunks, png_from_chunks, read_card, text_chunks)
from llmos.chat.personas import import_card, list_personas, load_persona, personas_dir, persona_from_card_data
from llmos.cli import app

V3 = {"spec": "chara_card_v3", "spec_version": "3.0", "data": {
    "name": "Mira Vey", "description": "{{char}} captains the airship Kestrel.", "personality": "dry wit",
    "scenario": "A storm over the northern sea.", "first_mes": "Welcome aboard, {{user}}.",
    "mes_example": "<START>\n{{user}}: Where to?\n{{char}}: North.\n<START>\n{{char}}: Tea?\n{{user}}: Please.\n{{char}}: Here.",
    "creator_notes": "Best with a slow burn.", "system_prompt": "{{original}} Stay in character as {{char}}.",
    "post_history_instructions": "Reply as {{char}} in two sentences.",
    "alternate_greetings": ["Storm's coming, {{user}}.", "<BOT> waves at <USER>."],
    "tags": ["adventure", "airship"], "creator": "someone", "character_version": "1.2",
    "extensions": {"depth_prompt": {"prompt": "x", "depth": 4}, "unknown_tool": {"keep": [1, 2]}},
    "character_book": {"name": "Kestrel", "entries": [
        {"keys": ["Kestrel"], "content": "The Kestrel flies on fog.", "enabled": True, "insertion_order": 10,
         "extensions": {"custom": True}}]},
    "group_only_greetings": ["Hello, crew."], "nickname": "Captain",
    "creator_notes_multilingual": {"en": "Best with a slow burn.", "fr": "Mieux en lent."},
    "source": ["https://example.org/mira"], "creation_date": 1700000000, "modification_date": 1700000001,
    "assets": [{"type": "icon", "uri": "ccdefault:", "name": "main", "ext": "png"}]}}

V2 = {"spec": "chara_card_v2", "spec_version": "2.0", "data": {
    "name": "Old Tom", "description": "A ferryman.", "personality": "", "scenario": "", "first_mes": "Fare?",
    "mes_example": "", "creator_notes": "", "system_prompt": "", "post_history_instructions": "",
    "alternate_greetings": [], "tags": [], "creator": "", "character_version": "", "extensions": {"talkativeness": "0.5"}}}


def picture(rgb=(10, 200, 30)) -> bytes:
    """A real 2x2 PNG with a text chunk of its own, to see that the image bytes are kept."""
    png = blank_png(2, 2, rgb)
    chunks = png_chunks(png)
    return png_from_chunks([chunks[0], (b"tEXt", b"Comment\0made by hand"), *chunks[1:]])


def png_card(*pairs, image=None) -> bytes:
    """A PNG with the given (keyword, object or raw text) tEXt chunks."""
    chunks = png_chunks(image or picture())
    texts = [(b"tEXt", key.encode() + b"\0" + (value if isinstance(value, bytes) else base64.b64encode(json.dumps(value).encode())))
             for key, value in pairs]
    return png_from_chunks(chunks[:-1] + texts + chunks[-1:])


def charx(card: dict, icon: bytes | None, icon_path="assets/icon/images/main.png", **others: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("card.json", json.dumps(card))
        if icon is not None:
            z.writestr(icon_path, icon)
        for path, data in others.items():
            z.writestr(path, data)
    return buf.getvalue()


HAPPY = {"assets/emotion/images/happy.png": b"a happy face"}


def with_icon(card: dict) -> dict:
    card = copy.deepcopy(card)
    card["data"]["assets"] = [{"type": "icon", "uri": "embeded://assets/icon/images/main.png", "name": "main", "ext": "png"},
                              {"type": "emotion", "uri": "embeded://assets/emotion/images/happy.png", "name": "happy", "ext": "png"}]
    return card


def chunk_json(png: bytes, key: str) -> dict:
    return json.loads(base64.b64decode(text_chunks(png_chunks(png))[key]))


# -- every field ------------------------------------------------------------------------------


def test_every_field_reaches_the_persona():
    p = persona_from_card_data(card_from_dict(copy.deepcopy(V3), "mira.json"), "mira.json")
    assert p.name == "Mira-Vey" and p.display_name == "Mira Vey"
    assert p.description == ("Mira Vey captains the airship Kestrel.\nPersonality: dry wit\n"
                             "Scenario: A storm over the northern sea.")
    assert p.greeting == "Welcome aboard, you."
    assert p.alternate_greetings == ["Storm's coming, you.", "Mira Vey waves at you."]  # V1's <BOT>/<USER> too
    assert p.examples == [{"user": "Where to?", "assistant": "North."}, {"user": "Please.", "assistant": "Here."}]
    assert p.system_prompt().startswith("Stay in character as Mira Vey.\nYou are Mira Vey.")  # {{original}} dropped
    assert p.post_history == "Reply as Mira Vey in two sentences."
    assert p.card == V3  # tags, creator notes (multilingual), book, extensions: all kept for export and lore


def test_v1_card_macros_and_export_as_v2():
    v1 = {"name": "Bob", "description": "<BOT> is a baker.", "personality": "kind", "scenario": "",
          "first_mes": "Hi <USER>!", "mes_example": "<START>\n<USER>: Bread?\n<BOT>: Always.", "talkativeness": "0.4"}
    card = card_from_dict(v1, "bob.json")
    assert card.spec == "chara_card_v2" and card.raw["data"]["talkativeness"] == "0.4"
    p = persona_from_card_data(card, "bob.json")
    assert (p.description.split("\n")[0], p.greeting) == ("Bob is a baker.", "Hi you!")
    assert p.examples == [{"user": "Bread?", "assistant": "Always."}]
    assert json.loads(export_card(card, "json"))["data"] == card.raw["data"]


# -- PNG --------------------------------------------------------------------------------------


def test_png_prefers_ccv3_and_keeps_the_picture():
    old = {**V2, "data": {**V2["data"], "name": "Older name"}}
    data = png_card(("chara", old), ("ccv3", V3))
    card = card_from_bytes(data, "mira.png")
    assert card.name == "Mira Vey" and card.raw == V3
    kept = png_chunks(card.image)
    assert (b"tEXt", b"Comment\0made by hand") in kept  # the image's own chunks stay, the card's go
    assert [k for k, b in kept if k == b"tEXt" and b.startswith((b"chara", b"ccv3"))] == []
    assert [b for k, b in kept if k == b"IDAT"] == [b for k, b in png_chunks(picture()) if k == b"IDAT"]
    assert card_from_bytes(png_card(("chara", V2)), "tom.png").raw == V2  # a V2-only PNG


def test_png_export_writes_both_chunks_and_round_trips():
    card = card_from_bytes(png_card(("ccv3", V3)), "mira.png")
    out = card_png(card, card.image)
    chunks = png_chunks(out)  # every CRC checked
    assert chunk_json(out, "ccv3") == V3
    assert chunk_json(out, "chara") == as_v2(V3) and chunk_json(out, "chara")["spec"] == "chara_card_v2"
    assert [b for k, b in chunks if k == b"IDAT"] == [b for k, b in png_chunks(picture()) if k == b"IDAT"]
    again = card_from_bytes(out, "again.png")
    assert again.raw == V3 and again.image == card.image
    out = card_png(card_from_dict(copy.deepcopy(V2), "tom"))
    assert chunk_json(out, "chara") == V2  # a V2 card's chara chunk is the card itself
    assert chunk_json(out, "ccv3")["data"] == {**V2["data"], "group_only_greetings": []}  # V3 requires one more field
    assert card_from_bytes(out, "tom.png").raw == V2  # a V3 chunk that only restates the V2 one: still the V2 card


def test_a_card_without_a_picture_gets_a_valid_png():
    out = card_png(card_from_dict(copy.deepcopy(V2), "tom"))
    chunks = png_chunks(out)
    width, height, depth, colour = struct.unpack(">IIBB", chunks[0][1][:10])
    assert (width, height, depth, colour) == (64, 64, 8, 2)
    raw = zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT"))
    assert len(raw) == height * (1 + 3 * width)  # a filter byte and RGB pixels per row
    assert chunk_json(out, "chara") == V2


# -- CHARX ------------------------------------------------------------------------------------


def test_charx_import_and_export():
    icon = picture((1, 2, 3))
    card = card_from_bytes(charx(with_icon(V3), icon, **HAPPY), "mira.charx")
    assert card.raw == with_icon(V3) and card.image == icon
    out = export_card(card, "charx", card.image)
    with zipfile.ZipFile(io.BytesIO(out)) as z:
        assert json.loads(z.read("card.json")) == with_icon(V3)
        assert z.read("assets/icon/images/main.png") == icon
        assert z.read("assets/emotion/images/happy.png") == b"a happy face"  # every asset kept
    again = card_from_bytes(out, "again.charx")
    assert again.raw == with_icon(V3) and again.image == icon
    plain = card_from_bytes(export_card(card_from_dict(copy.deepcopy(V2), "tom"), "charx"), "tom.charx")
    assert plain.raw["data"]["assets"][0]["uri"] == "embeded://assets/icon/images/main.png"  # a picture made for it
    assert png_chunks(plain.image)


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("data,needle", [
    (picture(), "holds no character card"),
    (png_card(("chara", b"not base64 at all!")), "'chara' chunk is not base64-encoded JSON"),
    (png_card(("ccv3", base64.b64encode(b"{broken"))), "'ccv3' chunk is not base64-encoded JSON"),
    (picture()[:-5] + b"\0\0\0\0\0", "wrong CRC"),
    (picture()[:40], "cut short"),
    (charx({"spec": "chara_card_v3", "data": {"name": "x"}}, None).replace(b"card.json", b"card.jsox"), "no card.json"),
    (b"PK\x03\x04 not really a zip", "damaged CHARX"),
    (b"GIF89a", "not a card"),
    (json.dumps({"spec": "chara_card_v9", "data": {"name": "x"}}).encode(), "unknown card spec"),
    (json.dumps({"spec": "chara_card_v2", "data": {"description": "nameless"}}).encode(), "has no 'name'"),
    (json.dumps({"spec": "chara_card_v2", "data": {"name": "x", "tags": "a,b"}}).encode(), "'tags' must be a list"),
    (json.dumps({"name": "x", "description": "y" * (MAX_FIELD + 1)}).encode(), "card.description is 1.0 MB"),
])
def test_bad_cards_are_one_clear_error(data, needle):
    with pytest.raises(CardError, match=needle):
        card_from_bytes(data, "bad")


def test_a_file_over_the_limit_is_refused_unread(tmp_path):
    big = tmp_path / "huge.png"
    with open(big, "wb") as f:
        f.truncate(21 * 1024 * 1024)  # sparse: nothing is written or read
    with pytest.raises(CardError, match="over the 20 MB limit"):
        read_card(big)


def test_a_bad_lorebook_in_a_card_is_refused_at_import():
    bad = {"spec": "chara_card_v2", "data": {"name": "x", "character_book": {"entries": [{"keys": ["a"], "content": 5}]}}}
    with pytest.raises(Exception, match="'content' must be text"):
        persona_from_card_data(card_from_dict(bad, "x.json"), "x.json")


# -- CLI and the persona store ----------------------------------------------------------------


def test_cli_import_export_round_trip(tmp_path):
    runner = CliRunner()
    (tmp_path / "mira.png").write_bytes(png_card(("chara", as_v2(V3)), ("ccv3", V3)))
    r = runner.invoke(app, ["personas", "import", str(tmp_path / "mira.png")])
    assert r.exit_code == 0 and "2 alternate greetings, 1 lore entries" in " ".join(r.output.split()), r.output
    assert (personas_dir() / "Mira-Vey.png").read_bytes() == card_from_bytes(png_card(("ccv3", V3)), "x").image
    for fmt in ("png", "charx", "json"):
        r = runner.invoke(app, ["personas", "export", "Mira-Vey", str(tmp_path / f"out.{fmt}")])
        assert r.exit_code == 0, r.output
        assert read_card(tmp_path / f"out.{fmt}").raw == V3 or fmt == "charx"
    assert read_card(tmp_path / "out.charx").raw["data"] == {**V3["data"], "assets": [
        {"type": "icon", "uri": "embeded://assets/icon/images/main.png", "name": "main", "ext": "png"}]}
    assert read_card(tmp_path / "out.png").image == (personas_dir() / "Mira-Vey.png").read_bytes()
    listed = " ".join(runner.invoke(app, ["personas"]).output.split())
    assert "Mira-Vey │ card │" in listed
    row = next(p for p in list_personas() if p["name"] == "Mira-Vey")
    assert (row["card"], row["tags"]) == ("chara_card_v3", ["adventure", "airship"])
    (tmp_path / "mira.charx").write_bytes(charx(with_icon(V3), picture(), **HAPPY))
    assert runner.invoke(app, ["personas", "import", str(tmp_path / "mira.charx")]).exit_code == 0
    assert runner.invoke(app, ["personas", "export", "Mira-Vey", str(tmp_path / "again.charx")]).exit_code == 0
    with zipfile.ZipFile(tmp_path / "again.charx") as z:
        assert z.read("assets/emotion/images/happy.png") == b"a happy face"
        assert json.loads(z.read("card.json")) == with_icon(V3)
    # a persona of our own exports as a V2 card that imports back to the same persona
    r = runner.invoke(app, ["personas", "export", "history-teacher", str(tmp_path / "teacher.json")])
    assert r.exit_code == 0, r.output
    p, _ = import_card(read_card(tmp_path / "teacher.json"), "teacher.json")
    teacher = load_persona("history-teacher")
    assert (p.description, p.greeting, p.examples) == (teacher.description, teacher.greeting, teacher.examples)


def test_cli_bad_card_is_one_line_and_imports_nothing(tmp_path):
    bad = tmp_path / "plain.png"
    bad.write_bytes(picture())
    before = sorted(personas_dir().glob("*")) if personas_dir().exists() else []
    r = CliRunner().invoke(app, ["personas", "import", str(bad)])
    assert r.exit_code == 2 and "holds no character card" in r.output and len(r.output.strip().splitlines()) == 1
    assert (sorted(personas_dir().glob("*")) if personas_dir().exists() else []) == before
    r = CliRunner().invoke(app, ["personas", "export", "assistant", str(tmp_path / "a.gif")])
    assert r.exit_code == 2 and "unknown card format 'gif'" in r.output


# -- HTTP -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_llm, tmp_path_factory):
    from helpers import ServerThread

    from llmos.db import Store
    from llmos.server.app import create_app

    s = ServerThread(create_app(tiny_llm, store=Store(tmp_path_factory.mktemp("cards") / "llmos.db"), max_len=512))
    yield s
    s.stop()


def test_cards_over_http(server):
    call = lambda method, path, body=None: httpx.request(method, server.url + path, json=body, timeout=60)  # noqa: E731
    upload = {"file": base64.b64encode(charx(with_icon(V3), picture((5, 6, 7)))).decode(), "filename": "mira.charx"}
    r = call("POST", "/api/personas/import", upload)
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "Mira-Vey" and r.json()["lore_entries"] == 1
    cards = {c["name"]: c for c in call("GET", "/api/cards").json()["cards"]}
    mira = cards["Mira-Vey"]
    assert mira["tags"] == ["adventure", "airship"] and mira["creator_notes_multilingual"]["fr"] == "Mieux en lent."
    pic = call("GET", mira["picture"])
    assert pic.headers["content-type"] == "image/png" and pic.content == picture((5, 6, 7))
    png = call("GET", "/api/personas/Mira-Vey/card?format=png")
    assert png.status_code == 200 and chunk_json(png.content, "ccv3") == with_icon(V3)
    assert call("POST", "/api/personas/import", copy.deepcopy(V2)).json()["name"] == "Old-Tom"  # plain JSON too
    # a card PNG of a few megabytes (a large picture) passes the server's 1 MB body limit for other routes
    from llmos.cards import card_from_dict, card_png

    big = card_png(card_from_dict({**copy.deepcopy(V2), "data": {**V2["data"], "name": "Big Tom"}}, "big"),
                   picture() + b"\0" * (3 * 2**20))
    r = call("POST", "/api/personas/import", {"file": base64.b64encode(big).decode(), "filename": "big.png"})
    assert r.status_code == 200 and r.json()["name"] == "Big-Tom", r.text[:300]
    assert call("POST", "/v1/completions", {"prompt": "x" * 2_000_000}).status_code == 413  # elsewhere, still 1 MB
    for body, status, needle in [
        ({"file": base64.b64encode(picture()).decode()}, 400, "holds no character card"),
        ({"file": "%%%"}, 400, "base64"),
        ({"spec": "chara_card_v2", "data": {}}, 400, "has no 'name'"),
    ]:
        r = call("POST", "/api/personas/import", body)
        assert r.status_code == status and needle in r.json()["error"]["message"], r.text
    assert call("GET", "/api/personas/Old-Tom/picture").status_code == 404
    assert call("GET", "/api/personas/Mira-Vey/card?format=gif").json()["error"]["param"] == "format"
    nai = {"lorebookVersion": 6, "entries": [{"text": "Fog.", "keys": ["fog"], "displayName": "fog"}]}
    entries = call("POST", "/api/lorebooks/read", nai).json()["entries"]
    assert [(e["keys"], e["content"]) for e in entries] == [(["fog"], "Fog.")]
    out = call("POST", "/api/lorebooks/write", {"entries": entries, "format": "world_info"}).json()
    assert out["entries"]["0"]["key"] == ["fog"]
    r = call("POST", "/api/lorebooks/read", {**nai, "lorebookVersion": 77})
    assert r.status_code == 400 and "lorebookVersion 77" in r.json()["error"]["message"]
    r = call("POST", "/api/lorebooks/write", {"entries": [{"keys": [], "content": "x", "position": "up"}]})
    assert r.status_code == 400 and "position must be one of" in r.json()["error"]["message"]


def test_studio_imports_a_card_and_shows_its_picture(server, tmp_path):
    card = tmp_path / "mira.png"
    card.write_bytes(png_card(("ccv3", {**V3, "data": {**V3["data"], "name": "Studio Mira"}}), image=picture((200, 10, 10))))
    from playwright.sync_api import sync_playwright

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "Debian's chromium is needed for the studio tests: apt-get install chromium"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = b.new_page()
        page.goto(server.url + "/")
        page.wait_for_function("() => document.body.dataset.ready === 'true'")
        page.click(".tabs button[data-tab=chat]")
        page.set_input_files("#card-file", str(card))
        page.wait_for_function("() => { const i = document.querySelector('#persona-picture');"
                               " return !i.classList.contains('hidden') && i.complete && i.naturalWidth === 2; }")
        assert page.eval_on_selector("#persona-pick", "e => e.value") == "Studio-Mira"
        assert "Tags: adventure, airship" in page.inner_text("#persona-about")
        assert "imported Studio Mira" in page.inner_text("#chat-status")
        page.click("#chat-new")
        page.fill("#chat-message", "Is the Kestrel fast?")
        page.click("#chat-send")
        page.wait_for_function("() => document.querySelector('#chat-context').textContent.includes('(lore)')", timeout=120_000)
        assert "(lore) 'Kestrel' fired (before char)" in page.eval_on_selector("#chat-context", "e => e.textContent")
        b.close()


def test_a_card_persona_opens_with_its_greetings_to_swipe(tiny_llm, tmp_path):
    from llmos.chat.conversation import Conversation
    from llmos.chat.sessions import Sessions
    from llmos.db import Store

    persona, _ = import_card(card_from_dict(copy.deepcopy(V3), "mira.json"), "mira.json")
    conv = Conversation(tiny_llm, Sessions(Store(tmp_path / "c.db")), None, "Mira-Vey")
    turns = conv.sessions.turns(conv.id, include_inactive=True)
    assert [(t["content"], bool(t["active"])) for t in turns] == [
        ("Welcome aboard, you.", True), ("Storm's coming, you.", False), ("Mira Vey waves at you.", False)]
    assert [t["content"] for t in conv.turns()] == ["Welcome aboard, you."]  # the first opens the chat
