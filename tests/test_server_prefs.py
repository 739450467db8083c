"""/api/preferences on a real server on 127.0.0.1: a studio choice (a kept candidate, thumbs,
a story branch) becomes the pairs `llmos prefs` reads from the same store; a bad choice is a
400 that says what is wrong; /api/write hands back the prompt a choice is stored under."""

import json

import httpx
import pytest

from helpers import ServerThread, llmos

KEY = "prefs-key"
CHAT = [{"role": "system", "content": "You are a poet."}, {"role": "user", "content": "A poem about rain."}]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("prefs-home")


@pytest.fixture(scope="module")
def server(tiny_llm, home):
    from llmos.db import Store
    from llmos.server.app import create_app

    s = ServerThread(create_app(tiny_llm, store=Store(home / "llmos.db"), max_len=512))
    yield s
    s.stop()


def call(server, method, path, body=None, **kw):
    return httpx.request(method, server.url + path, json=body, timeout=120, **kw)


def pairs(server, **query) -> list[dict]:
    r = call(server, "GET", "/api/preferences", params=query)
    assert r.status_code == 200, r.text
    return r.json()["pairs"]


def test_kept_and_rated_candidates_become_the_pairs_llmos_prefs_lists(server, home):
    pick = {"prompt": CHAT, "candidates": ["Rain on tin.", "Grey sky, grey sea.", "Puddles."], "kept": 1,
            "source": "studio-pick", "model": "tiny", "meta": {"task": "poem"}}
    assert call(server, "POST", "/api/preferences", pick).json() == {"added": 2, "pairs": 2}
    thumbs = {"prompt": "Once upon a time", "candidates": [" a fox", " a hen", " a fox "], "ratings": [1, -1, None],
              "source": "studio-thumbs"}
    assert call(server, "POST", "/api/preferences", thumbs).json() == {"added": 1, "pairs": 1}
    stars = {"prompt": "The lighthouse", "candidates": ["stood.", "fell.", "slept."], "ratings": [5, 2, 2],
             "source": "studio-branch"}
    assert call(server, "POST", "/api/preferences", stars).json() == {"added": 2, "pairs": 2}

    got = pairs(server)
    assert [(p["source"], p["chosen"], p["rejected"]) for p in got] == [
        ("studio-pick", "Grey sky, grey sea.", "Rain on tin."), ("studio-pick", "Grey sky, grey sea.", "Puddles."),
        ("studio-thumbs", " a fox", " a hen"),
        ("studio-branch", "stood.", "fell."), ("studio-branch", "stood.", "slept.")]
    assert got[0]["prompt"] == CHAT and got[0]["model"] == "tiny" and got[0]["meta"] == {"task": "poem"}
    assert got[2]["prompt"] == "Once upon a time" and got[2]["model"] == ""

    # the same choice again stores nothing new; the answer still says what it gives
    assert call(server, "POST", "/api/preferences", pick).json() == {"added": 0, "pairs": 2}
    assert len(pairs(server)) == 5
    assert [p["chosen"] for p in pairs(server, source="studio-thumbs")] == [" a fox"]
    assert len(pairs(server, limit=2)) == 2 and pairs(server, model="tiny") == got[:2]
    stats = {s["source"]: s for s in call(server, "GET", "/api/preferences/stats").json()["sources"]}
    assert {k: (s["pairs"], s["prompts"]) for k, s in stats.items()} == {
        "studio-branch": (2, 1), "studio-pick": (2, 1), "studio-thumbs": (1, 1)}

    # the command line reads the same SQLite file
    proc = llmos("prefs", "list", "--json", home=home)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line) for line in proc.stdout.splitlines()] == got


GOOD = {"prompt": "It was night.", "candidates": ["The owl woke.", "The moon rose."], "kept": 0, "source": "studio-pick"}


@pytest.mark.parametrize("change, param, message", [
    ({"candidates": ["Only one."]}, "candidates", "a choice needs two candidates or more, got 1"),
    ({"candidates": ["x"] * 17}, "candidates", "at most 16"),
    ({"candidates": ["The owl woke.", "  "]}, "candidates", "candidates[1] is empty"),
    ({"kept": 2}, "kept", "kept: 2 is not one of the 2 candidates (0 to 1)"),
    ({"kept": -1}, "kept", "kept: -1 is not one of the 2 candidates"),
    ({"kept": None}, "kept", "nothing is preferred; give kept"),
    ({"kept": None, "ratings": [1, 1]}, "kept", "ratings with two different values"),
    ({"ratings": [1]}, "ratings", "1 ratings for 2 candidates"),
    ({"ratings": [7, None]}, "ratings", "7 is not a rating; use -1 and 1"),
    ({"ratings": [0, 1]}, "ratings", "0 is not a rating"),
    ({"ratings": [-1, 5]}, "ratings", "mixed in one choice"),
    ({"source": "chat-rating"}, "source", "'studio-pick', 'studio-thumbs' or 'studio-branch'"),
    ({"prompt": [{"role": "narrator", "content": "x"}]}, "prompt", "prompt[0] needs a role (system, user, assistant)"),
    ({"prompt": [{"role": "user"}]}, "prompt", "prompt[0] needs a role"),
    ({"prompt": []}, "prompt", "a string or a non-empty list of chat messages"),
    ({"chosen": "The owl woke."}, "chosen", "Extra inputs are not permitted"),
])
def test_a_bad_choice_is_a_400_that_says_what_is_wrong(server, change, param, message):
    before = len(pairs(server))
    r = call(server, "POST", "/api/preferences", {**GOOD, **change})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert len(pairs(server)) == before


def test_listing_checks_its_filters(server):
    r = call(server, "GET", "/api/preferences", params={"source": "studio"})
    assert r.status_code == 400 and "unknown source 'studio'" in r.json()["error"]["message"]
    assert "chat-rating" in r.json()["error"]["message"]  # the sources it knows
    r = call(server, "GET", "/api/preferences", params={"limit": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "query.limit"


def test_a_key_and_the_origin_guard_the_preferences(tiny_llm, tmp_path):
    from llmos.db import Store
    from llmos.server.app import create_app

    s = ServerThread(create_app(tiny_llm, api_key=KEY, store=Store(tmp_path / "llmos.db")))
    try:
        for method, path, body in (("POST", "/api/preferences", GOOD), ("GET", "/api/preferences", None),
                                   ("GET", "/api/preferences/stats", None)):
            assert call(s, method, path, body).status_code == 401, path
            assert call(s, method, path, body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200, path
        foreign = call(s, "POST", "/api/preferences", GOOD,
                       headers={"Authorization": f"Bearer {KEY}", "Origin": "https://elsewhere.example"})
        assert foreign.status_code == 403
        assert len(call(s, "GET", "/api/preferences", headers={"Authorization": f"Bearer {KEY}"}).json()["pairs"]) == 1
    finally:
        s.stop()


def test_write_answers_with_the_prompt_a_choice_is_stored_under(server, tiny_llm):
    from llmos.writing.tasks import WriteRequest, prepare_write

    body = {"task": "poem", "brief": "rain", "form": "haiku", "n": 2, "max_tokens": 40, "seed": 3}
    out = call(server, "POST", "/api/write", body).json()
    expected = prepare_write(tiny_llm, WriteRequest("poem", "rain", lang="en", form="haiku"))[0]
    assert out["prompt"] == expected
    streamed = call(server, "POST", "/api/write", {**body, "stream": True})
    result = [json.loads(line[5:]) for line in streamed.text.splitlines()
              if line.startswith("data:") and line[5:].strip() != "[DONE]"][-1]["result"]
    assert result["prompt"] == expected

    texts = [c["text"] for c in out["candidates"]]
    assert texts[0].strip() != texts[1].strip()
    choice = {"prompt": out["prompt"], "candidates": texts, "kept": 1, "source": "studio-pick", "model": out["model"]}
    assert call(server, "POST", "/api/preferences", choice).json() == {"added": 1, "pairs": 1}
    stored = pairs(server, source="studio-pick")[-1]
    assert (stored["prompt"], stored["chosen"], stored["rejected"], stored["model"]) == (
        expected, texts[1], texts[0], tiny_llm.name)
