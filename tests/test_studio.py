"""The studio page, driven in headless Chromium (Debian's) with Playwright."""

import shutil
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
    page.locator(".result button").first.click()  # insert into the story
    text = editor_text(page)
    assert text.startswith("The harbour was quiet.\n\n")
    lines = text.split("\n\n", 1)[1].strip().splitlines()
    assert len(lines) == 4 and all(
        len(ln) == 6 and all("CJK" in unicodedata.name(c) for c in ln[:5]) for ln in lines)
    page.click(".tabs button[data-tab=chat]")
    page.select_option("#persona-pick", "history-teacher")  # a built-in persona fills the prompt
    assert page.eval_on_selector("#persona", "e => e.value").startswith("You are history-teacher.")
    assert page.locator(".msg").count() == 1  # its greeting
    page.fill("#chat-message", "hello")
    page.click("#chat-send")
    page.wait_for_function("() => document.querySelectorAll('.msg').length === 3")
    page.close()
