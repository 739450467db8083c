"""Swipes: every reply a chat message got stays its alternative, browsable and selectable in the
library, over HTTP, in the REPL and in the studio; the persona's greetings before the first
message. The tiny model's chat replies are all "" (see test_chat.py), so its tests check which
turn is active by id; the preference pair a swipe leads to needs words, from SmolLM2."""

import json

import httpx
import pytest

from helpers import ServerThread, llmos
from llmos.chat.conversation import ChatSettings, Conversation
from llmos.chat.personas import Persona, save_persona
from llmos.chat.sessions import SessionError, Sessions
from llmos.data.prefs import Preferences
from llmos.db import Store

GREETINGS = ["Ahoy, writer.", "The tide is in: what shall we write?", "Back at the harbour, I see."]


def harbour() -> Persona:
    return Persona(name="harbour-master", description="Keeps the harbour's logbook.", greeting=GREETINGS[0],
                   alternate_greetings=GREETINGS[1:])


@pytest.fixture
def sessions(tmp_path):
    return Sessions(Store(tmp_path / "chat.db"))


def active_ids(conv) -> list[int]:
    return [t["id"] for t in conv.turns()]


def test_alternatives_and_selection(tiny_llm, sessions):
    conv = Conversation(tiny_llm, sessions, persona="writing-coach", settings=ChatSettings(max_tokens=3, seed=1))
    "".join(conv.send("hello"))
    "".join(conv.retry())
    "".join(conv.swipe(2))  # one past the last: a new reply, as retry
    alts = conv.alternatives()
    user = conv.turns()[1]
    assert alts.reply_to == user["id"] and alts.latest and len(alts.turns) == 3
    assert [t["active"] for t in alts.turns] == [0, 0, 1] and alts.index == 2
    assert all(t["meta"]["reply_to"] == user["id"] for t in alts.turns)

    first, second, third = (t["id"] for t in alts.turns)
    "".join(conv.swipe(0))
    assert conv.alternatives().index == 0 and active_ids(conv)[-1] == first and len(conv.turns()) == 3
    "".join(conv.swipe(turn=second))
    assert conv.alternatives(third).index == 1 and active_ids(conv)[-1] == second
    assert conv.alternatives(user["id"]).turns == conv.alternatives().turns  # by the message or one of its replies

    with pytest.raises(SessionError, match="no alternative 4: the replies are 0 to 2 .3 writes a new one."):
        conv.swipe(4)
    with pytest.raises(SessionError, match=f"turn {user['id']} is a message, not a reply"):
        conv.swipe(turn=user["id"])
    with pytest.raises(SessionError, match="no turn 999 in chat session"):
        conv.alternatives(999)
    with pytest.raises(ValueError, match="one of them"):
        conv.swipe(0, turn=first)
    assert active_ids(conv)[-1] == second  # a refused swipe changes nothing


def test_an_older_message_cannot_be_swiped(tiny_llm, sessions):
    conv = Conversation(tiny_llm, sessions, persona="writing-coach", settings=ChatSettings(max_tokens=3, seed=1))
    "".join(conv.send("first message"))
    "".join(conv.retry())
    older = conv.alternatives()
    "".join(conv.send("second message"))
    before = active_ids(conv)
    browsed = conv.alternatives(older.reply_to)
    assert not browsed.latest and [t["id"] for t in browsed.turns] == [t["id"] for t in older.turns]
    with pytest.raises(SessionError, match=r"answers an older message: swiping it would orphan the 2 turn\(s\) after it"):
        conv.swipe(turn=older.turns[0]["id"])
    assert active_ids(conv) == before
    conv.undo()  # back to the older message: its replies are the latest again
    "".join(conv.swipe(turn=older.turns[0]["id"]))
    assert active_ids(conv)[-1] == older.turns[0]["id"]


def test_greetings_are_swiped_before_the_first_message(tiny_llm, sessions):
    conv = Conversation(tiny_llm, sessions, persona=harbour(), settings=ChatSettings(max_tokens=3, seed=1))
    alts = conv.alternatives()
    assert alts.reply_to is None and alts.latest and alts.index == 0
    assert [t["content"] for t in alts.turns] == GREETINGS and [t["content"] for t in conv.turns()] == GREETINGS[:1]
    assert "".join(conv.swipe(2)) == GREETINGS[2]
    assert [t["content"] for t in conv.turns()] == [GREETINGS[2]]
    with pytest.raises(SessionError, match="no alternative 3: the greetings are 0 to 2$"):
        conv.swipe(3)  # no new greeting is written
    "".join(conv.send("hello"))
    assert conv.last_context.messages[1] == {"role": "assistant", "content": GREETINGS[2]}  # the chosen one was sent
    greeting = conv.turns()[0]["id"]
    assert conv.alternatives(greeting).index == 2 and not conv.alternatives(greeting).latest
    with pytest.raises(SessionError, match="greetings can be swiped only before the first message"):
        conv.swipe(turn=greeting)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from llmos.llm import LLM

    return LLM.load(smollm2_dir)


@pytest.mark.bundled
def test_going_on_after_a_swipe_keeps_that_reply_over_the_others(smollm2, tmp_path):
    store = Store(tmp_path / "chat.db")
    conv = Conversation(smollm2, Sessions(store), persona="writing-coach",
                        settings=ChatSettings(max_tokens=8, seed=1, temperature=1.0))
    first = "".join(conv.send("Suggest a title for a sea story")).strip()
    conv.settings.seed = 2
    second = "".join(conv.swipe(1)).strip()  # a new reply
    assert first and second and first != second
    assert "".join(conv.swipe(0)) == first  # back to the first: the writer goes on from it
    assert Preferences(store).list("chat-retry") == []  # nothing is kept before the writer goes on
    "".join(conv.send("Thanks, and a subtitle?"))
    kept = Preferences(store).list("chat-retry")
    assert [(p.chosen, p.rejected) for p in kept] == [(first, second)]
    assert kept[0].prompt[-1] == {"role": "user", "content": "Suggest a title for a sea story"}


# -- over HTTP --


@pytest.fixture(scope="module")
def server(tiny_llm, tmp_path_factory):
    from llmos.server.app import create_app

    s = ServerThread(create_app(tiny_llm, store=Store(tmp_path_factory.mktemp("db") / "llmos.db"), max_len=512))
    yield s
    s.stop()


def call(server, method, path, body=None):
    return httpx.request(method, server.url + path, json=body, timeout=120)


def test_swipes_over_http(server):
    sid = call(server, "POST", "/api/chat/sessions", {"persona": "writing-coach"}).json()["id"]
    base = f"/api/chat/sessions/{sid}"
    call(server, "POST", f"{base}/messages", {"content": "first", "max_tokens": 3})
    call(server, "POST", f"{base}/retry", {"max_tokens": 3, "seed": 2})
    new = call(server, "POST", f"{base}/swipe", {"index": 2, "max_tokens": 3, "seed": 3, "stream": True})
    assert new.status_code == 200 and new.text.rstrip().endswith("data: [DONE]")
    alts = call(server, "GET", f"{base}/alternatives").json()
    assert alts["latest"] and alts["index"] == 2 and len(alts["alternatives"]) == 3
    ids = [t["id"] for t in alts["alternatives"]]

    picked = call(server, "POST", f"{base}/swipe", {"index": 0})
    assert picked.status_code == 200, picked.text
    assert picked.json()["turn"]["id"] == ids[0] and picked.json()["turn"]["active"] == 1
    assert call(server, "GET", base).json()["turns"][-1]["id"] == ids[0]
    by_turn = call(server, "POST", f"{base}/swipe", {"turn": ids[1]}).json()
    assert by_turn["turn"]["id"] == ids[1]
    assert call(server, "GET", f"{base}/alternatives?turn={ids[2]}").json()["index"] == 1

    call(server, "POST", f"{base}/messages", {"content": "second", "max_tokens": 3})
    for body, status, param, needle in [
        ({"index": 5}, 400, "index", "no alternative 5: the replies are 0 to 0 (1 writes a new one)"),
        ({"turn": ids[0]}, 400, "turn", "answers an older message"),
        ({"index": 0, "turn": ids[0]}, 400, "turn", "one of them"),
        ({}, 400, "index", "one of them"),
        ({"index": "first"}, 400, "index", "index"),
    ]:
        r = call(server, "POST", f"{base}/swipe", body)
        assert r.status_code == status and r.json()["error"]["param"] == param and needle in r.json()["error"]["message"], r.text
    older = call(server, "GET", f"{base}/alternatives?turn={ids[0]}").json()
    assert not older["latest"] and older["index"] == 1
    missing = call(server, "GET", f"{base}/alternatives?turn=99999")
    assert missing.status_code == 400 and "no turn 99999" in missing.json()["error"]["message"]
    assert call(server, "GET", "/api/chat/sessions/99999/alternatives").status_code == 404
    assert call(server, "POST", "/api/chat/sessions/99999/swipe", {"index": 0}).status_code == 404
    paths = call(server, "GET", "/openapi.json").json()["paths"]
    assert "requestBody" in paths["/api/chat/sessions/{session_id}/swipe"]["post"]
    listed = paths["/api/chat/sessions/{session_id}/alternatives"]["get"]["responses"]["200"]["content"]
    assert listed["application/json"]["schema"] == {"$ref": "#/components/schemas/Alternatives"}


def test_greeting_swipes_over_http(server):
    save_persona(harbour())  # in this test's LLMOS_HOME, which the server reads too
    sid = call(server, "POST", "/api/chat/sessions", {"persona": "harbour-master"}).json()["id"]
    alts = call(server, "GET", f"/api/chat/sessions/{sid}/alternatives").json()
    assert alts["reply_to"] is None and [t["content"] for t in alts["alternatives"]] == GREETINGS
    assert call(server, "POST", f"/api/chat/sessions/{sid}/swipe", {"index": 1}).json()["reply"] == GREETINGS[1]
    assert [t["content"] for t in call(server, "GET", f"/api/chat/sessions/{sid}").json()["turns"]] == [GREETINGS[1]]


# -- the REPL --


def test_swipe_in_piped_chat(tiny_dir, tmp_path):
    proc = llmos("chat", "-m", str(tiny_dir), "-p", "writing-coach", "--max-tokens", "3", "--seed", "1",
                 stdin="hello\n/retry\n/swipe\n/swipe 1\n/swipe 4\n/swipe two\n/help\n", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "replies to your last message (/swipe N picks one; /swipe 3 writes a new one):" in proc.stderr
    assert "  1  (empty)\n* 2  (empty)" in proc.stderr  # the retry's reply was the active one
    assert "/swipe takes 1 to 3 here" in proc.stderr and "/swipe takes the number of a reply" in proc.stderr
    assert "/swipe [N]" in proc.stderr  # in /help
    record = json.loads(llmos("sessions", "export", "1", "--format", "json", home=tmp_path).stdout)
    replies = [t for t in record["turns"] if t["role"] == "assistant" and t["meta"].get("reply_to")]
    assert [t["active"] for t in replies] == [1, 0]  # /swipe 1 went back to the first reply


# -- the studio --


def test_studio_arrows_browse_and_write_replies(server):
    import shutil

    from playwright.sync_api import sync_playwright

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "Debian's chromium is needed for the studio tests: apt-get install chromium (.ci/run does)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_function("() => document.body.dataset.ready === 'true'")
            page.click(".tabs button[data-tab=chat]")
            page.select_option("#persona-pick", "writing-coach")
            page.fill("#chat-message", "hello")
            page.click("#chat-send")
            page.wait_for_selector("#chat-swipe-pos >> text=1/1")
            sid = int(page.eval_on_selector("#session-pick", "e => e.value"))
            page.click("#chat-swipe-next")  # past the last: a new reply
            page.wait_for_selector("#chat-swipe-pos >> text=2/2")
            page.click("#chat-swipe-prev")
            page.wait_for_selector("#chat-swipe-pos >> text=1/2")
            assert page.is_disabled("#chat-swipe-prev")
        finally:
            browser.close()
    alts = call(server, "GET", f"/api/chat/sessions/{sid}/alternatives").json()
    assert len(alts["alternatives"]) == 2 and alts["index"] == 0
