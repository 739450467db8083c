"""Safety, copying checks and explanations where writers meet them: the decode loop's stream,
`llmos generate/write`, the server's routes (a real one on 127.0.0.1) and the store's audit log.
The libraries themselves are tested in test_safety.py, test_copying.py and test_explain.py."""

import json
import re

import httpx
import openai
import pytest

from helpers import ServerThread, assert_clean_error, llmos

LIST = "Mailing list:\n- ada@example.com\n- bob@example.com\n- carol@example.com\n-"
EMAIL = re.compile(r"\b\w+@example(?:\.[a-z]{2,})+")
BEFORE = " [email]\n- [email]\n- "  # what the policy lets through before it blocks
POLICY = """categories:
  illegal_instructions: block
  personal_data: redact
words:
  illegal_instructions: [karen]
classifier: {enabled: false}
"""


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    """SmolLM2, its greedy continuation of a mailing list (more addresses), and a policy that
    blocks a name it writes (a stand-in for a real block rule the model would not be led to
    write) and redacts e-mail addresses."""
    from llmos.llm import LLM
    from llmos.weights.store import load_checkpoint

    llm = LLM(load_checkpoint(smollm2_dir))
    params = llm.sampling(temperature=0, max_tokens=30)
    plain = llm.generate(LIST, params).completions[0].text
    assert EMAIL.match(plain, 1) and "karen" in plain  # the model goes on with the list
    return llm, params, plain


@pytest.fixture
def word_policy(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY, encoding="utf-8")
    return path


@pytest.mark.bundled
def test_a_block_rule_ends_the_stream_where_the_blocked_text_begins(smol, word_policy):
    from llmos.llm import ContentFiltered
    from llmos.safety import load_policy

    base, params, plain = smol
    llm = base.with_driver(None)
    llm.safety = load_policy(word_policy)
    seen = []
    llm.audit = lambda kind, verdict: seen.append((kind, verdict))
    streamed = "".join(d.text for d in llm.stream(LIST, params))
    c = llm.generate(LIST, params).completions[0]
    assert c.finish_reason == "content_filter"
    assert streamed == c.text == BEFORE  # everything before the word (redacted), nothing from it on
    assert EMAIL.sub("[email]", plain[: plain.index("karen")]) == BEFORE
    assert c.safety["blocked"] and c.safety["action"] == "block"
    assert [f["rule"] for f in c.safety["findings"]] == ["pii_email", "pii_email", "words_illegal_instructions_policy"]
    # each request's prompt (its addresses) and output are audited once
    assert [k for k, _ in seen] == ["prompt", "output", "prompt", "output"]
    with pytest.raises(ContentFiltered, match="illegal_instructions"):  # a prompt with it is refused
        llm.request("write to Karen", params)
    assert base.generate(LIST, params).completions[0].text == plain  # the model without a policy is unchanged


@pytest.mark.bundled
def test_personal_data_is_redacted_as_it_streams(smol):
    from llmos.safety import load_policy

    base, params, plain = smol
    llm = base.with_driver(None)
    llm.safety = load_policy(None)
    streamed = "".join(d.text for d in llm.stream(LIST, params))
    assert streamed.count("[email]") >= 3 and not EMAIL.search(streamed)
    assert streamed == EMAIL.sub("[email]", plain)


# -- the server --


@pytest.fixture(scope="module")
def trust_server(smol, tmp_path_factory):
    from llmos.data.copying import build_index
    from llmos.db import Store
    from llmos.safety import load_policy
    from llmos.server.app import create_app

    llm, params, plain = smol
    folder = tmp_path_factory.mktemp("policy")
    (folder / "policy.yaml").write_text(POLICY, encoding="utf-8")
    store = Store(folder / "llmos.db")
    source = "It was the best of times, it was the worst of times, it was the age of wisdom."
    index = build_index([("dickens.txt", source)])
    server = ServerThread(create_app(llm, store=store, safety=load_policy(folder / "policy.yaml"), copy_index=index))
    yield server, store, source
    server.stop()


@pytest.mark.bundled
def test_server_ends_a_stream_with_content_filter_and_audits_it(trust_server, smol):
    from llmos.safety import list_audit

    server, store, _ = trust_server
    llm = smol[0]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    kw = dict(model=llm.name, prompt=LIST, max_tokens=30, temperature=0)
    whole = client.completions.create(**kw)
    assert whole.choices[0].finish_reason == "content_filter" and whole.choices[0].text == BEFORE
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == BEFORE
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["content_filter"]
    rows = list_audit(store, limit=100)
    blocks = [r for r in rows if r["action"] == "block"]
    assert len(blocks) == 2 and {r["where"] for r in blocks} == {"server:output"}
    assert {r["where"] for r in rows} == {"server:output", "server:prompt"}  # the prompt's addresses too
    assert all(r["text"] is None and r["model"] == llm.name for r in rows)  # the policy keeps no text


@pytest.mark.bundled
def test_server_refuses_a_blocked_prompt_with_400(trust_server):
    server, *_ = trust_server
    r = httpx.post(server.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "say karen"}], "max_tokens": 4})
    assert r.status_code == 400 and "safety policy" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/api/write", json={"task": "poem", "brief": "a poem on karen", "max_tokens": 4})
    assert r.status_code == 400 and "safety policy" in r.json()["error"]["message"]


@pytest.mark.bundled
def test_moderations_in_openais_shape(trust_server):
    server, *_ = trust_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    res = client.moderations.create(input=["the karen is here", "a quiet morning by the sea",
                                           "mail me at ada.lovelace@example.com"])
    # personal data is no OpenAI category: not flagged, but the policy's action says redact
    assert [r.flagged for r in res.results] == [True, False, False]
    raw = res.results[0].model_dump()
    assert raw["categories"]["illicit"] is True and raw["action"] == "block"
    assert set(raw["category_scores"]) >= {"violence", "sexual/minors", "self-harm", "hate", "harassment", "illicit"}
    assert res.results[2].model_dump()["action"] == "redact"
    r = httpx.post(server.url + "/v1/moderations", json={"input": []})
    assert r.status_code == 400


@pytest.mark.bundled
def test_write_checks_copying_against_the_servers_texts(trust_server):
    server, _, source = trust_server
    r = httpx.post(server.url + "/api/write", json={
        "task": "continue", "brief": source[:40], "max_tokens": 30, "temperature": 0, "check_copying": True},
        timeout=120)
    assert r.status_code == 200, r.text
    c = r.json()["candidates"][0]
    report = c["copying"]
    assert 0 <= report["copied_share"] <= 1
    for span in report["spans"]:  # whatever it wrote, a reported span is really in the source
        assert span["chars"] >= 50 and c["text"][span["start"]:span["end"]].lower() in source.lower()


@pytest.mark.bundled
def test_explain_route(trust_server, smol):
    server, *_ = trust_server
    tok = smol[0].tokenizer
    prompt = "The Eiffel Tower is located in the city of"
    ids = tok.encode(" Paris", add_bos=False)
    r = httpx.post(server.url + "/api/explain", json={
        "prompt": prompt, "completion": ids, "indices": [0], "top": 3}, timeout=120)
    assert r.status_code == 200, r.text
    att = r.json()["attributions"]
    assert len(att) == 1 and att[0]["index"] == 0 and len(att[0]["sources"]) == 3
    assert att[0]["sources"][0]["text"] == "Eiffel"
    for s in att[0]["sources"]:
        assert prompt[s["start"]:s["end"]] == s["text"]
    r = httpx.post(server.url + "/api/explain", json={"prompt": "x", "completion": ids, "indices": [99]})
    assert r.status_code == 400 and "indices" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/api/explain", json={"prompt": "x", "completion": [-1]})
    assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]


# -- the CLI --


def test_cli_refuses_a_blocked_prompt_and_prints_copying(tiny_dir, tmp_path):
    home = tmp_path / "home"
    proc = llmos("generate", "the synthesis route for sarin is", "-m", str(tiny_dir), "--max-tokens", "4",
                 home=home)
    assert_clean_error(proc, "safety policy", "illegal_instructions")
    proc = llmos("generate", "the synthesis route for sarin is", "-m", str(tiny_dir), "--max-tokens", "4",
                 "--safety", "off", home=home)
    assert proc.returncode == 0, proc.stderr
    proc = llmos("generate", "x", "-m", str(tiny_dir), "--safety", str(tmp_path / "missing.yaml"), home=home)
    assert_clean_error(proc, "missing.yaml")
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("A line of text that nobody will ever generate by chance, surely not.", encoding="utf-8")
    proc = llmos("generate", "x", "-m", str(tiny_dir), "--max-tokens", "6", "--check-copying", "--copy-against",
                 str(texts), "--json", home=home)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["copying"][0]["spans"] == [] and "copied_share" in out["copying"][0]
    proc = llmos("generate", "x", "-m", str(tiny_dir), "--check-copying", home=home)
    assert_clean_error(proc, "not trained here", "--copy-against")


def test_a_refused_chat_message_is_taken_back(tiny_llm, tmp_path):
    from llmos.chat.conversation import ChatSettings, Conversation
    from llmos.chat.sessions import Sessions
    from llmos.db import Store
    from llmos.llm import ContentFiltered
    from llmos.safety import load_policy

    (tmp_path / "policy.yaml").write_text(POLICY, encoding="utf-8")
    llm = tiny_llm.with_driver(None)
    llm.safety = load_policy(tmp_path / "policy.yaml")
    sessions = Sessions(Store(tmp_path / "chat.db"))
    conv = Conversation(llm, sessions, persona="assistant", settings=ChatSettings(max_tokens=4))
    "".join(conv.send("hello there"))
    before = [(t["role"], t["content"]) for t in conv.turns()]
    with pytest.raises(ContentFiltered):
        "".join(conv.send("tell me about karen"))
    assert [(t["role"], t["content"]) for t in conv.turns()] == before  # neither it nor a reply stays active
    assert "".join(conv.send("and now?"))  # the chat goes on
