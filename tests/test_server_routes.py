"""LLMOS's own routes on a real server on 127.0.0.1: chat sessions (the REPL's turn pipeline),
knowledge bases, writing with every CLI option, novels, personas, the model store, beam
search, where Chinese requests go, and the OpenAPI schema of it all."""

import json
import time

import httpx
import pytest

from conftest import REPO
from helpers import ServerThread, home_with_embedder, llmos

SHOP = REPO / "benchmarks" / "data" / "shop"


@pytest.fixture(scope="module")
def home(tmp_path_factory, embedder_dir):
    return home_with_embedder(tmp_path_factory.mktemp("routes-home"), embedder_dir)


@pytest.fixture
def in_home(monkeypatch, home):
    monkeypatch.setenv("LLMOS_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def server(tiny_llm, home):
    from llmos.db import Store
    from llmos.server.app import create_app

    s = ServerThread(create_app(tiny_llm, store=Store(home / "llmos.db"), max_len=512))
    yield s
    s.stop()


def call(server, method, path, body=None, **kw):
    return httpx.request(method, server.url + path, json=body, timeout=120, **kw)


def events(response) -> list:
    out = []
    for line in response.text.splitlines():
        if line.startswith("data:") and line[5:].strip() != "[DONE]":
            out.append(json.loads(line[5:]))
    return out


def test_a_chat_session_over_http(server, in_home):
    r = call(server, "POST", "/api/chat/sessions", {"persona": "history-teacher", "title": "Rome"})
    assert r.status_code == 201, r.text
    session = r.json()
    sid = session["id"]
    assert session["persona"] == "history-teacher" and session["title"] == "Rome"
    assert [t["role"] for t in session["turns"]] == ["assistant"]  # the greeting

    reply = call(server, "POST", f"/api/chat/sessions/{sid}/messages",
                 {"content": "my name is Ada", "max_tokens": 8, "seed": 1}).json()
    assert reply["session"] == sid and reply["turn"]["role"] == "assistant" and reply["turn"]["content"] == reply["reply"]
    assert call(server, "GET", f"/api/chat/sessions/{sid}").json()["facts"] == ["The user's name is Ada."]

    streamed = call(server, "POST", f"/api/chat/sessions/{sid}/messages",
                    {"content": "tell me more", "max_tokens": 8, "seed": 2, "stream": True})
    assert streamed.text.rstrip().endswith("data: [DONE]")
    got = events(streamed)
    assert "context" in got[0] and "tell me more" in got[0]["context"]  # what was sent to the model
    text = "".join(e.get("text", "") for e in got)
    final = got[-1]["turn"]
    assert final["reply"] == text.strip() and final["turn"]["content"] == text.strip()

    before = call(server, "GET", f"/api/chat/sessions/{sid}").json()["turns"]
    retried = call(server, "POST", f"/api/chat/sessions/{sid}/retry", {"max_tokens": 8, "seed": 3}).json()
    after = call(server, "GET", f"/api/chat/sessions/{sid}").json()["turns"]
    assert len(after) == len(before) and after[-1]["id"] == retried["turn"]["id"] != before[-1]["id"]

    edited = call(server, "POST", f"/api/chat/sessions/{sid}/edit", {"content": "tell me less", "max_tokens": 6}).json()
    users = [t["content"] for t in call(server, "GET", f"/api/chat/sessions/{sid}").json()["turns"] if t["role"] == "user"]
    assert users == ["my name is Ada", "tell me less"] and edited["turn"]["role"] == "assistant"

    assert call(server, "POST", f"/api/chat/sessions/{sid}/rate", {"rating": "up"}).json()["turns"][-1]["rating"] == 5
    bad = call(server, "POST", f"/api/chat/sessions/{sid}/rate", {"rating": 9})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "rating"
    pinned = call(server, "POST", f"/api/chat/sessions/{sid}/facts", {"fact": "Ada writes about Rome"}).json()
    assert pinned["pinned"] and "Ada writes about Rome" in pinned["facts"]
    assert not call(server, "POST", f"/api/chat/sessions/{sid}/facts", {"fact": "Ada writes about Rome"}).json()["pinned"]

    taken = call(server, "POST", f"/api/chat/sessions/{sid}/undo").json()
    assert taken["taken"] == "tell me less"
    renamed = call(server, "PATCH", f"/api/chat/sessions/{sid}", {"title": "Rome, again", "persona": "writing-coach"}).json()
    assert renamed["title"] == "Rome, again" and renamed["persona"] == "writing-coach"

    md = call(server, "GET", f"/api/chat/sessions/{sid}/export?format=md").text
    assert md.startswith(f"# Chat {sid}: Rome, again") and "_(replaced)_" in md and "Ada writes about Rome" in md
    record = json.loads(call(server, "GET", f"/api/chat/sessions/{sid}/export?format=json").text)
    assert any(not t["active"] for t in record["turns"])
    assert sid in [s["id"] for s in call(server, "GET", "/api/chat/sessions").json()["sessions"]]
    assert call(server, "DELETE", f"/api/chat/sessions/{sid}").json() == {"deleted": sid}
    assert call(server, "GET", f"/api/chat/sessions/{sid}").status_code == 404


@pytest.mark.parametrize("method, path, body, status, param", [
    ("POST", "/api/chat/sessions", {"persona": "nobody"}, 400, "persona"),
    ("POST", "/api/chat/sessions", {"kb": "missing"}, 400, "kb"),
    ("POST", "/api/chat/sessions", {"colour": "red"}, 400, "colour"),
    ("POST", "/api/chat/sessions/9999/messages", {"content": "hi"}, 404, "session_id"),
    ("POST", "/api/chat/sessions/9999/undo", None, 404, "session_id"),
    ("GET", "/api/chat/sessions/9999/export", None, 404, "session_id"),
    ("GET", "/api/kb/missing", None, 404, "name"),
    ("GET", "/api/kb/bad name!/search?q=x", None, 400, "name"),
    ("POST", "/api/kb/x/documents", {"documents": []}, 400, "documents"),
    ("POST", "/api/write", {"task": "novel", "brief": "x"}, 400, "book"),
    ("POST", "/api/write", {"task": "novel", "brief": "x", "book": "../up"}, 400, "book"),
    ("POST", "/api/personas/import", {"description": "no name"}, 400, "card"),
    ("GET", "/api/personas/nobody", None, 404, "name"),
    ("POST", "/v1/completions", {"prompt": "x", "beams": 2, "n": 3}, 400, "n"),
])
def test_bad_requests_name_what_is_wrong(server, in_home, method, path, body, status, param):
    r = call(server, method, path, body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["message"]


def test_an_empty_message_and_nothing_to_retry(server, in_home):
    sid = call(server, "POST", "/api/chat/sessions", {}).json()["id"]
    assert call(server, "POST", f"/api/chat/sessions/{sid}/messages", {"content": ""}).status_code == 400
    r = call(server, "POST", f"/api/chat/sessions/{sid}/retry")
    assert r.status_code == 400 and "nothing to retry" in r.json()["error"]["message"]


@pytest.mark.bundled
def test_a_client_that_leaves_mid_reply_frees_its_rows_and_keeps_the_text(smollm2_dir, home, in_home):
    """On SmolLM2, whose replies are words (the tiny model's chat replies are blank lines, which
    would make "the text is kept" hold whatever was kept)."""
    from llmos.chat.sessions import Sessions
    from llmos.db import Store
    from llmos.llm import LLM
    from llmos.server.app import create_app

    s = ServerThread(create_app(LLM.load(smollm2_dir), store=Store(home / "smol.db"), max_len=1024, multilingual=None))
    try:
        scheduler = s.server.config.app.state.scheduler
        sid = call(s, "POST", "/api/chat/sessions", {"persona": "writing-coach"}).json()["id"]
        received = ""
        with httpx.stream("POST", s.url + f"/api/chat/sessions/{sid}/messages", timeout=60,
                          json={"content": "Write me a very long story about a lighthouse.", "max_tokens": 600,
                                "stream": True, "seed": 1}) as r:
            for line in r.iter_lines():
                if line.startswith("data:") and '"text"' in line:
                    received += json.loads(line[5:])["text"]
                    if len(received.split()) >= 5:
                        break
        at_leave = scheduler.stats["generated_tokens"]
        deadline = time.time() + 20
        while scheduler.running and time.time() < deadline:
            time.sleep(0.05)
        assert scheduler.running == 0
        assert scheduler.stats["generated_tokens"] - at_leave <= 5  # freed within a step or so, not run on to 600
        sessions = Sessions(s.server.config.app.state.store)
        deadline = time.time() + 10
        while time.time() < deadline and sessions.turns(sid)[-1]["role"] != "assistant":
            time.sleep(0.05)
        last = sessions.turns(sid)[-1]
        assert last["role"] == "assistant" and last["meta"].get("interrupted") is True
        assert len(received.split()) >= 5 and last["content"].startswith(received.strip())  # what was written is kept
    finally:
        s.stop()


@pytest.mark.bundled
def test_knowledge_bases_over_http_and_in_a_chat(server, in_home):
    docs = [{"name": p.name, "text": p.read_text()} for p in (SHOP / "faq.md", SHOP / "shop.md")]
    added = call(server, "POST", "/api/kb/shop/documents", {"documents": docs}).json()
    assert sorted(added["added"]) == ["upload/faq.md", "upload/shop.md"] and added["passages"] > 5
    again = call(server, "POST", "/api/kb/shop/documents", {"documents": docs[:1]}).json()
    assert again["unchanged"] == ["upload/faq.md"] and again["added"] == []
    assert "shop" in [k["name"] for k in call(server, "GET", "/api/kb").json()["knowledge_bases"]]
    listed = call(server, "GET", "/api/kb/shop").json()["documents"]
    assert [d["path"] for d in listed] == ["upload/faq.md", "upload/shop.md"]
    hits = call(server, "GET", "/api/kb/shop/search?q=lettering%20lessons&k=2").json()["hits"]
    assert hits[0]["source"] == "shop.md" and hits[0]["heading"] == "Calligraphy workshops"
    # a chat on the knowledge base answers an FAQ question from it, with its source
    question = next(line[2:].strip() for line in SHOP.joinpath("faq.md").read_text().splitlines() if line.startswith("Q:"))
    sid = call(server, "POST", "/api/chat/sessions", {"persona": "support", "kb": "shop"}).json()["id"]
    turn = call(server, "POST", f"/api/chat/sessions/{sid}/messages", {"content": question}).json()
    assert turn["strategy"] == "faq" and "Source: faq.md" in turn["reply"]
    assert call(server, "DELETE", "/api/kb/shop/documents?path=upload/faq.md").json() == {"deleted": "upload/faq.md"}
    assert [d["path"] for d in call(server, "GET", "/api/kb/shop").json()["documents"]] == ["upload/shop.md"]
    assert call(server, "DELETE", "/api/kb/shop").json() == {"deleted": "shop"}
    assert call(server, "GET", "/api/kb/shop").status_code == 404


def test_write_with_the_clis_options_gives_the_clis_result(server, tiny_dir, in_home):
    body = {"task": "poem", "brief": "rain", "form": "haiku", "n": 3, "rank": True, "seed": 4, "max_tokens": 40}
    api = call(server, "POST", "/api/write", body).json()
    assert [c["form_problems"] for c in api["candidates"]] == [[], [], []]
    cli = llmos("write", "poem", "rain", "--form", "haiku", "-n", "3", "--rank", "--seed", "4", "--max-tokens", "40",
                "--json", "--precision", "fp32", "-m", str(tiny_dir), home=in_home)
    assert cli.returncode == 0, cli.stderr
    cli = json.loads(cli.stdout)
    assert [c["text"] for c in api["candidates"]] == [c["text"] for c in cli["completions"]]
    assert api["ranking"] == cli["ranking"] and api["form"] == cli["form"]

    rewrite = call(server, "POST", "/api/write", {"task": "rewrite", "brief": "me and him goes", "max_tokens": 20,
                                                  "seed": 1, "dry": 0.8, "allow_phrases": True}).json()
    assert set(rewrite["revision"]) == {"revised", "suggestions", "diff"}
    ideas = call(server, "POST", "/api/write", {"task": "brainstorm", "brief": "a heist", "variables": {"n": "3"},
                                                "max_tokens": 30, "seed": 1}).json()
    assert isinstance(ideas["ideas"], list) and len(ideas["ideas"]) <= 3
    streamed = events(call(server, "POST", "/api/write", {**body, "stream": True}))
    assert streamed[-1]["result"]["ranking"] == api["ranking"]
    texts = ["".join(e.get("text", "") for e in streamed if e.get("index") == i) for i in range(3)]
    assert texts == [c["text"] for c in api["candidates"]]


def test_banned_phrases_and_generate_options(server, tiny_llm, in_home):
    plain = call(server, "POST", "/v1/completions", {"prompt": "the", "max_tokens": 12, "temperature": 0}).json()
    first_word = plain["choices"][0]["text"].strip().split(" ")[0]
    assert first_word
    banned = call(server, "POST", "/v1/completions", {"prompt": "the", "max_tokens": 12, "temperature": 0,
                                                     "ban": [first_word]}).json()
    assert first_word not in banned["choices"][0]["text"]
    def text(**options):
        return call(server, "POST", "/v1/completions", {"prompt": "the", "max_tokens": 30, "temperature": 0,
                                                        **options}).json()["choices"][0]["text"]

    direct = tiny_llm.generate("the", tiny_llm.sampling(max_tokens=30, temperature=0, no_repeat_ngram_size=2))
    ids = direct.completions[0].token_ids
    pairs = list(zip(ids, ids[1:]))
    assert len(ids) >= 20 and len(set(pairs)) == len(pairs)  # no token bigram twice
    assert text(no_repeat_ngram_size=2) == direct.completions[0].text != text()  # the server applies the option
    beams = call(server, "POST", "/v1/completions", {"prompt": "the cat", "max_tokens": 8, "beams": 3, "n": 2}).json()
    direct = tiny_llm.beam_search("the cat", 3, 8, n=2)
    assert [c["text"] for c in beams["choices"]] == [c.text for c in direct.completions]


def test_write_bans_strings_by_rewinding(server, in_home):
    body = {"task": "story", "brief": "a storm", "max_tokens": 12, "seed": 1, "n": 2, "allow_phrases": True}
    plain = call(server, "POST", "/api/write", {**body, "task": "continue"}).json()
    written = "".join(c["text"] for c in plain["candidates"]).lower()
    favourite = max(written, key=written.count)  # what the tiny model writes most (a newline, in chat)
    banned = call(server, "POST", "/api/write", {**body, "task": "continue", "banned_strings": [favourite]})
    assert banned.status_code == 200, banned.text
    texts = [c["text"] for c in banned.json()["candidates"]]
    assert all(t and favourite not in t.lower() for t in texts), (favourite, texts)


def test_a_novel_over_http_resumes_from_its_files(server, in_home):
    body = {"task": "novel", "brief": "a lighthouse keeper", "book": "keeper", "chapters": 1, "seed": 1}
    first = call(server, "POST", "/api/write", body).json()
    names = [s["name"] for s in first["stages"]]
    assert names == ["premise", "outline", "plan of chapter 1", "chapter 1", "summary of chapter 1", "ledger of chapter 1"]
    assert all(s["generated"] for s in first["stages"]) and (in_home / "books" / "keeper" / "chapters" / "01.md").is_file()
    (in_home / "books" / "keeper" / "chapters" / "01.md").unlink()  # the writer deletes a chapter: only it is redone
    streamed = events(call(server, "POST", "/api/write", {**body, "stream": True}))
    redone = {e["stage"]["name"]: e["stage"]["generated"] for e in streamed}
    assert redone["premise"] is False and redone["chapter 1"] is True and redone["summary of chapter 1"] is True


def test_personas_and_the_model_store(server, in_home):
    card = {"spec": "chara_card_v2", "data": {"name": "Captain Vale", "description": "A smuggler.",
                                              "first_mes": "Ahoy, {{user}}.", "mes_example": ""}}
    r = call(server, "POST", "/api/personas/import", card).json()
    assert r["name"] == "Captain-Vale"
    shown = call(server, "GET", "/api/personas/Captain-Vale").json()
    assert shown["greeting"] == "Ahoy, you." and shown["description"] == "A smuggler."
    assert "Captain-Vale" in [p["name"] for p in call(server, "GET", "/api/personas").json()["personas"]]
    models = call(server, "GET", "/api/models").json()["models"]
    assert {"smollm2-135m-instruct", "gemma3-270m"} <= {m["name"] for m in models}
    r = call(server, "POST", "/api/models/no-such-model/pull")
    assert r.status_code == 404 and "unknown model" in r.json()["error"]["message"]


def test_check_poem_over_http(server, in_home):
    r = call(server, "POST", "/api/check-poem", {"text": "床前明月光，疑是地上霜。举头望明月，低头思故乡。"})
    assert r.status_code == 200 and r.json()["form"] == "五言绝句" and not r.json()["ok"]
    assert [(p["line"], p["rule"]) for p in r.json()["problems"]] == [(2, "tone"), (3, "tone")]
    r = call(server, "POST", "/api/check-poem", {"text": "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。", "tones": "strict"})
    assert r.json() == {"form": "五言绝句", "ok": True, "problems": []}
    r = call(server, "POST", "/api/check-poem", {"text": "床前明月光。", "form": "词:念奴娇"})
    assert r.status_code == 400 and "词:浣溪沙" in r.json()["error"]["message"]
    r = call(server, "POST", "/api/check-poem", {"text": "床前明月光。", "tones": "exact"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tones"


def test_chinese_on_an_english_server_says_why(server, in_home):
    r = call(server, "POST", "/api/write", {"task": "poem", "brief": "春天", "max_tokens": 5})
    assert r.status_code == 200 and "multilingual" in r.headers["x-llmos-note"]
    r = call(server, "POST", "/api/write", {"task": "poem", "brief": "spring", "max_tokens": 5})
    assert "x-llmos-note" not in r.headers


@pytest.mark.bundled
def test_chinese_goes_to_the_multilingual_model(tiny_llm, gemma3_dir, tmp_path, monkeypatch):
    from llmos.db import Store
    from llmos.server.app import create_app

    s = ServerThread(create_app(tiny_llm, store=Store(tmp_path / "db"), multilingual=str(gemma3_dir)))
    try:
        zh = call(s, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "写一句关于秋天的诗"}],
                                                      "max_tokens": 12, "temperature": 0}).json()
        en = call(s, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "autumn"}],
                                                      "max_tokens": 4, "temperature": 0}).json()
        assert zh["model"] == "gemma3-270m" and en["model"] == tiny_llm.name
        assert any("\u4e00" <= ch <= "\u9fff" for ch in zh["choices"][0]["message"]["content"])
        named = call(s, "POST", "/v1/chat/completions", {"model": tiny_llm.name, "max_tokens": 2,
                                                         "messages": [{"role": "user", "content": "秋天"}]}).json()
        assert named["model"] == tiny_llm.name  # a named model is always used
        assert {m["id"] for m in call(s, "GET", "/v1/models").json()["data"]} == {tiny_llm.name, "gemma3-270m"}
        # a persona in Chinese starts its sessions on the multilingual model
        personas = tmp_path / "personas"
        personas.mkdir()
        monkeypatch.setenv("LLMOS_HOME", str(tmp_path))
        (personas / "laoshi.yaml").write_text("name: laoshi\ndescription: 一位耐心的语文老师。\nlanguage: zh\n", encoding="utf-8")
        session = call(s, "POST", "/api/chat/sessions", {"persona": "laoshi"}).json()
        assert session["model"] == "gemma3-270m"
    finally:
        s.stop()


def test_every_route_is_documented(server):
    spec = call(server, "GET", "/openapi.json").json()
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            ok = op["responses"].get("200") or op["responses"].get("201") or op["responses"].get("202")
            assert ok and ok.get("content"), f"{method.upper()} {path} documents no response"
            schema = next(iter(ok["content"].values())).get("schema")
            if path not in ("/api/chat/sessions/{session_id}/export", "/api/projects/{project_id}/export", "/metrics"):
                assert schema, f"{method.upper()} {path} has no response schema"
            if method in ("post", "put", "patch") and not path.endswith(("/undo", "/pull", "/stop")):  # actions without a body
                assert "requestBody" in op, f"{method.upper()} {path} documents no request body"
    for needed in ("/api/chat/sessions", "/api/chat/sessions/{session_id}/messages", "/api/kb/{name}/documents",
                   "/api/kb/{name}/search", "/api/write", "/api/models", "/api/personas/import", "/v1/embeddings",
                   "/api/train", "/api/jobs/{job_id}", "/api/preferences", "/api/preferences/stats"):
        assert needed in spec["paths"]


def wait_job(server, job_id, until=("done", "failed", "stopped"), timeout=240, check=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = call(server, "GET", f"/api/jobs/{job_id}").json()
        if job["status"] in until and (check is None or check(job)):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {job['status']}: {job['log'][-2000:]}")


@pytest.mark.slow
def test_prepare_train_resume_stop_and_export_as_jobs(server, in_home, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Verse {i}: the sea, the salt, the slow grey light of morning {i % 7}." for i in range(400)))
    job = call(server, "POST", "/api/prepare", {"inputs": [str(corpus)], "output": str(tmp_path / "data")})
    assert job.status_code == 202 and job.json()["command"][:2] == ["llmos", "prepare"]
    done = wait_job(server, job.json()["id"])
    assert done["status"] == "done", done["log"]

    opts = {"preset": "baby-gpt", "max_steps": 4, "eval_interval": 2, "eval_iters": 1, "batch_size": 2, "log_interval": 1}
    body = {"data": str(tmp_path / "data"), "output": str(tmp_path / "run"), "options": opts, "set": ["n_layer=1"]}
    for bad, needle in (({"lr": 5}, "lr must be in (0, 1)"), ({"learning_rate": 1}, "learning_rate"),
                        ({"model": {"n_layers": 2}}, "n_layers")):
        r = call(server, "POST", "/api/train", {**body, "options": {**opts, **bad}})
        assert r.status_code == 400 and needle in r.json()["error"]["message"]
    r = call(server, "POST", "/api/train", {**body, "data": str(tmp_path / "nothing")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "data"

    trained = wait_job(server, call(server, "POST", "/api/train", body).json()["id"])
    assert trained["status"] == "done", trained["log"]
    assert trained["progress"]["step"] == 4 and (tmp_path / "run" / "LATEST").is_file()
    resumed = wait_job(server, call(server, "POST", "/api/train", {"data": body["data"], "output": body["output"],
                                                                 "options": {"max_steps": 6}, "resume": True}).json()["id"])
    assert resumed["status"] == "done" and resumed["progress"]["step"] == 6, resumed["log"]

    long = call(server, "POST", "/api/train", {**body, "output": str(tmp_path / "long"),
                                               "options": {**opts, "max_steps": 100000}}).json()
    wait_job(server, long["id"], until=("running",), check=lambda j: (j["progress"] or {}).get("step", 0) >= 3)
    stopped = call(server, "POST", f"/api/jobs/{long['id']}/stop").json()
    assert stopped["status"] == "stopped" and "--resume" in stopped["log"]
    assert (tmp_path / "long" / "LATEST").is_file()  # the last checkpoint is kept

    ngram = wait_job(server, call(server, "POST", "/api/ngram", {"data": body["data"], "order": 3}).json()["id"])
    assert ngram["status"] == "done" and "perplexity" in ngram["log"]
    exported = wait_job(server, call(server, "POST", "/api/export", {"model": body["output"],
                                                                   "output": str(tmp_path / "hf")}).json()["id"])
    assert exported["status"] == "done" and (tmp_path / "hf" / "config.json").is_file()
    listed = [j["id"] for j in call(server, "GET", "/api/jobs").json()["jobs"]]
    assert listed[:2] == [exported["id"], ngram["id"]]
    assert call(server, "GET", "/api/jobs/999").status_code == 404


def test_story_continue_takes_every_lore_field_and_the_new_samplers(server, in_home):
    lore = [{"keys": ["harbour"], "secondary_keys": ["storm"], "logic": "and_any", "content": "The harbour floods.",
             "name": "flood"},
            {"keys": ["harbour"], "secondary_keys": ["storm"], "logic": "not_any", "content": "The harbour is calm.",
             "name": "calm", "position": "at_depth", "depth": 1}]
    body = {"text": "We walked to the harbour at dawn.", "lorebook": lore, "max_tokens": 3, "seed": 1,
            "xtc_probability": 0.5, "xtc_threshold": 0.1, "banned_strings": ["the harbour"]}
    r = call(server, "POST", "/api/story/continue", body)
    assert r.status_code == 200, r.text
    parts = events(r)[0]["context"]
    lore_parts = [p for p in parts if p["kind"].startswith("lore")]
    # no "storm" in the text: the AND_ANY entry stays out, the NOT_ANY one fires, placed at its depth
    assert any("calm" in p["reason"] for p in lore_parts if p["kind"] == "lore")
    assert not any(p["kind"] == "lore" and "flood" in p["reason"] for p in lore_parts)
    assert "The harbour is calm." in events(r)[0]["prompt"]
    bad = call(server, "POST", "/api/story/continue", {"text": "x", "lorebook": [{"keys": ["a"], "content": "b",
                                                                                    "logic": "maybe"}]})
    assert bad.status_code == 400 and "logic must be one of" in bad.json()["error"]["message"]
    assert bad.json()["error"]["param"] == "lorebook"
