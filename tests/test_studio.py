"""The studio page, driven in headless Chromium (Debian's) with Playwright."""

import json
import shutil
import time
import unicodedata

import pytest

from conftest import REPO
from helpers import ServerThread

ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="module")
def studio(tiny_llm, tmp_path_factory):
    from llmos.server.app import create_app
    from llmos.db import Store

    s = ServerThread(create_app(tiny_llm, store=Store(tmp_path_factory.mktemp("db") / "studio.db")))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "Debian's chromium is needed for the studio tests: apt-get install chromium (.ci/run does)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield b
        b.close()


def wait_ready(page):
    page.wait_for_function("() => document.body.dataset.ready === 'true'")
    assert page.inner_text("#model-name").startswith("model:")


def editor_text(page) -> str:
    return page.eval_on_selector("#editor", "e => e.value")


def wait_idle(page):
    page.wait_for_function("() => document.querySelector('#stop').disabled && !document.querySelector('#generate').disabled")


def test_generate_retry_branch_probabilities_and_reload(studio, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(studio.url + "/")
    wait_ready(page)
    page.fill("#max_tokens", "12")
    page.fill("#editor", "Once upon a time")
    page.click("#generate")
    wait_idle(page)
    first = editor_text(page)
    assert first.startswith("Once upon a time") and len(first) > len("Once upon a time")

    page.click("#retry")  # a second version of the last part, kept as an alternative
    wait_idle(page)
    assert page.locator("#alternatives li").count() == 2
    second = editor_text(page)

    page.locator("#alternatives li").nth(0).click()  # pick the first version back
    assert editor_text(page) == first
    assert page.locator("#alternatives li.current").count() == 1

    page.click("#undo")  # back to the second version, then to it again via the branch tree
    assert editor_text(page) == second
    page.locator("#tree li").filter(has_text=first[len("Once upon a time"):].strip()[:20]).first.click()
    assert editor_text(page) == first

    page.check("#show-probs")
    tokens = page.locator("#probability .tok")
    assert tokens.count() >= 5
    tokens.nth(2).click()
    page.wait_for_selector("#token-popup button")
    page.locator("#token-popup button").nth(1).click()  # continue from an alternative token
    wait_idle(page)
    assert page.locator("#alternatives li").count() == 3
    branched = editor_text(page)
    assert branched.startswith("Once upon a time")

    page.fill("#memory", "A fox who keeps a lighthouse.")
    page.wait_for_function("() => document.querySelector('#save-state').textContent === 'saved'")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "studio.png"), full_page=True)

    page.reload()
    wait_ready(page)
    assert editor_text(page) == branched
    assert page.eval_on_selector("#memory", "e => e.value") == "A fox who keeps a lighthouse."
    assert page.locator("#alternatives li").count() == 3
    page.close()


def test_edit_text_tasks_and_chat(studio, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(studio.url + "/")
    wait_ready(page)
    page.click("#new-project")
    page.fill("#editor", "The harbour was quiet.")
    page.wait_for_function("() => document.querySelector('#save-state').textContent === 'saved'")
    page.click(".tabs button[data-tab=tasks]")
    page.select_option("#task", "poem")
    page.fill("#brief", "春天")
    page.select_option("#form", "五言绝句")
    page.fill("#task-n", "2")
    page.click("#run-task")
    page.wait_for_selector(".result")
    assert page.locator(".result").count() == 2
    assert page.locator(".result", has_text="form kept").count() == 2
    page.locator(".result").first.get_by_role("button", name="Insert into story").click()
    text = editor_text(page)
    assert text.startswith("The harbour was quiet.\n\n")
    lines = text.split("\n\n", 1)[1].strip().splitlines()
    assert len(lines) == 4 and all(
        len(ln) == 6 and all("CJK" in unicodedata.name(c) for c in ln[:5]) for ln in lines)
    page.close()


def chat_idle(page):
    """The reply is written and the session reloaded from the server."""
    page.wait_for_function("() => document.body.dataset.chatBusy === 'false'")


def message_count(page) -> int:
    return page.locator("#chat-log .msg").count()


def test_chat_sessions_go_on_between_the_studio_and_the_terminal(tiny_llm, tiny_dir, session_home, browser):
    """The chat pane runs on the session endpoints: a chat started in the studio continues in
    `llmos chat --session N`, and one started in the terminal continues in the studio."""
    from llmos.chat.sessions import Sessions
    from llmos.db import Store
    from llmos.server.app import create_app

    from helpers import llmos

    store = Store(session_home / "llmos.db")  # the store the terminal uses too
    server = ServerThread(create_app(tiny_llm, store=store))
    sessions = Sessions(store)
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(server.url + "/")
        wait_ready(page)
        page.click(".tabs button[data-tab=chat]")
        page.select_option("#persona-pick", "history-teacher")
        page.click("#chat-new")
        page.wait_for_function("() => document.querySelector('#session-pick').value !== ''")
        sid = int(page.eval_on_selector("#session-pick", "e => e.value"))
        assert message_count(page) == 1  # the persona's greeting is the first turn
        assert sessions.get(sid)["persona"] == "history-teacher"

        page.fill("#chat-message", "hello")
        page.click("#chat-send")
        page.wait_for_function("() => document.querySelectorAll('#chat-log .msg').length === 3")
        chat_idle(page)
        first_reply = sessions.turns(sid)[-1]
        assert [t["content"] for t in sessions.turns(sid) if t["role"] == "user"] == ["hello"]
        assert first_reply["role"] == "assistant"
        page.evaluate("() => { document.body.dataset.chatBusy = 'pending'; }")
        page.click("#chat-retry")  # a new reply; the old one stays in the session, inactive
        chat_idle(page)
        page.wait_for_function("() => document.querySelectorAll('#chat-log .msg').length === 3")
        every = sessions.turns(sid, include_inactive=True)
        assert [t["id"] for t in every if not t["active"]] == [first_reply["id"]]

        page.click("#chat-up")
        page.wait_for_selector("#chat-log .msg.assistant .rated")
        assert sessions.turns(sid)[-1]["rating"] == 5
        page.fill("#chat-fact", "my novel is set in Lisbon")
        page.click("#chat-pin")
        page.wait_for_selector("#chat-facts-list li")
        assert "my novel is set in Lisbon" in sessions.facts(sid)

        # the terminal goes on with it, on the model the session was started with
        proc = llmos("chat", "--session", str(sid), home=session_home, stdin="and then?\n")
        assert proc.returncode == 0, proc.stderr
        assert [t["content"] for t in sessions.turns(sid) if t["role"] == "user"] == ["hello", "and then?"]
        page.select_option("#session-pick", "")
        page.select_option("#session-pick", str(sid))
        page.wait_for_selector("#chat-log .msg.user >> text=and then?")
        assert message_count(page) == 5

        # a chat started in the terminal goes on in the studio
        proc = llmos("chat", "--persona", "writing-coach", "-m", str(tiny_dir), home=session_home, stdin="hi coach\n")
        assert proc.returncode == 0, proc.stderr
        other = max(s["id"] for s in sessions.list())
        assert other != sid and sessions.get(other)["persona"] == "writing-coach"
        page.reload()
        wait_ready(page)
        page.click(".tabs button[data-tab=chat]")
        page.select_option("#session-pick", str(other))
        page.wait_for_selector("#chat-log .msg.user >> text=hi coach")
        page.fill("#chat-message", "one more thing")
        page.click("#chat-send")
        chat_idle(page)
        page.wait_for_function("() => document.querySelectorAll('#chat-log .msg.assistant').length >= 2")
        assert [t["content"] for t in sessions.turns(other) if t["role"] == "user"] == ["hi coach", "one more thing"]
        assert page.eval_on_selector("#persona-pick", "e => e.value") == "writing-coach"
        page.screenshot(path=str(ARTIFACTS / "studio-chat.png"), full_page=True)
        page.close()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def guarded_studio(tiny_llm, tmp_path_factory):
    """A studio whose server checks safety (a policy blocking one word) and copying (a small text)."""
    from llmos.data.copying import build_index
    from llmos.db import Store
    from llmos.safety import load_policy
    from llmos.server.app import create_app

    folder = tmp_path_factory.mktemp("guarded")
    (folder / "policy.yaml").write_text("categories:\n  illegal_instructions: block\nwords:\n"
                                        "  illegal_instructions: [karen]\nclassifier: {enabled: false}\n")
    index = build_index([("notes.txt", "A note that the tiny model will not write, whatever it samples.")])
    s = ServerThread(create_app(tiny_llm, store=Store(folder / "studio.db"),
                                safety=load_policy(folder / "policy.yaml"), copy_index=index))
    yield s
    s.stop()


def test_safety_copying_and_why_are_shown(guarded_studio, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(guarded_studio.url + "/")
    wait_ready(page)
    page.click("#new-project")
    page.fill("#max_tokens", "6")
    page.fill("#editor", "Karen opened the door.")  # a prompt the policy refuses: said, not hidden
    page.click("#generate")
    wait_idle(page)
    assert "safety policy" in page.inner_text("#status")

    page.fill("#editor", "The cat sat on the mat")
    page.click("#generate")
    wait_idle(page)
    page.check("#show-probs")
    page.locator("#probability .tok").nth(1).click()
    page.click("#token-popup button:has-text('Why this token?')")
    page.wait_for_selector(".why mark")
    marks = page.locator(".why mark").all_inner_texts()
    assert marks and all(m in "The cat sat on the mat" for m in marks)

    page.click(".tabs button[data-tab=tasks]")
    page.select_option("#task", "poem")
    page.fill("#brief", "the sea")
    page.fill("#task-n", "1")
    page.check("#task-copying")
    page.click("#run-task")
    page.wait_for_selector(".result .badge")
    assert "copying: no verbatim span of 50+ characters" in page.inner_text(".result .badge")
    page.close()


def wait_for(check, timeout=30):
    """check()'s first truthy value, polled (the page saves in the background)."""
    deadline = time.time() + timeout
    while not (value := check()):
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)
    return value


def test_thumbs_an_inserted_candidate_and_a_continued_branch_are_stored_as_pairs(tiny_llm, tmp_path, browser):
    from llmos.data.prefs import Preferences
    from llmos.db import Store
    from llmos.server.app import create_app

    store = Store(tmp_path / "llmos.db")
    prefs = Preferences(store)
    server = ServerThread(create_app(tiny_llm, store=store))
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        sent = []
        page.on("request", lambda r: sent.append(r.url) if r.method == "POST" and "/api/preferences" in r.url else None)
        page.goto(server.url + "/")
        wait_ready(page)
        page.click(".tabs button[data-tab=tasks]")
        page.select_option("#task", "poem")
        page.fill("#brief", "春天")
        page.select_option("#form", "五言绝句")
        page.fill("#task-n", "2")
        page.click("#run-task")
        page.wait_for_selector(".result .thumb")
        texts = page.eval_on_selector_all(".result", "els => els.map(e => e.firstChild.textContent)")
        assert len(texts) == 2 and texts[0].strip() != texts[1].strip()
        first, second = page.locator(".result").nth(0), page.locator(".result").nth(1)

        good = first.get_by_role("button", name="Good")
        good.click()
        assert good.get_attribute("aria-pressed") == "true"
        assert first.get_by_role("button", name="Bad").get_attribute("aria-pressed") == "false"
        second.get_by_role("button", name="Bad").click()  # one up and one down: a preference
        page.wait_for_function("() => document.querySelector('#task-status').textContent === 'preference saved'")
        [thumbs] = prefs.list("studio-thumbs")
        assert (thumbs.chosen, thumbs.rejected, thumbs.model, thumbs.meta) == (texts[0], texts[1], tiny_llm.name,
                                                                               {"task": "poem"})
        assert "春天" in json.dumps(thumbs.prompt, ensure_ascii=False)  # /api/write's prompt, sent back
        page.screenshot(path=str(ARTIFACTS / "studio-preferences.png"), full_page=True)

        second.get_by_role("button", name="Insert into story").click()  # the writer keeps the other one after all
        [pick] = wait_for(lambda: prefs.list("studio-pick"))
        assert (pick.prompt, pick.chosen, pick.rejected) == (thumbs.prompt, texts[1], texts[0])

        # story: two versions of the next part, then the writer goes on from the first one
        assert editor_text(page) == "\n\n" + texts[1]
        base = editor_text(page) + "\n\nThe cat sat on"
        page.fill("#editor", base)
        page.fill("#max_tokens", "8")
        page.click("#generate")
        wait_idle(page)
        kept = editor_text(page)[len(base):]
        page.check("#show-probs")  # the tiny model repeats itself: a Retry would write the same again,
        page.locator("#probability .tok").nth(0).click()  # so the sibling starts from another first token
        page.locator("#token-popup button").nth(1).click()
        wait_idle(page)
        other = editor_text(page)[len(base):]
        assert kept.strip() and other.strip() and kept.strip() != other.strip()
        assert page.locator("#alternatives li").count() == 2
        page.locator("#alternatives li").nth(0).click()
        page.click("#generate")
        wait_idle(page)
        assert page.inner_text("#status") == "preference saved"
        [branch] = prefs.list("studio-branch")
        assert (branch.prompt, branch.chosen, branch.rejected, branch.model) == (base, kept, other, tiny_llm.name)

        posted = len(sent)
        page.click("#retry")  # going on from the same part again: the page remembers it sent that choice
        wait_idle(page)
        assert page.inner_text("#status") == "" and len(sent) == posted
        assert len(prefs.list()) == 3
        page.close()
    finally:
        server.stop()
