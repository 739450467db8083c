"""A real server on 127.0.0.1, driven by the official `openai` client and raw HTTP."""

import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest

from helpers import ServerThread

KEY = "test-key"


def make_server(tiny_llm, tmp_path_factory, **kw):
    from llmos.server.app import create_app
    from llmos.db import Store

    store = Store(tmp_path_factory.mktemp("db") / "llmos.db")
    return ServerThread(create_app(tiny_llm, store=store, **kw))


@pytest.fixture(scope="module")
def backend(tiny_llm, tmp_path_factory):
    """A second server, without a key: the 'remote' model of the main one."""
    s = make_server(tiny_llm, tmp_path_factory)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def server(tiny_llm, tmp_path_factory, backend):
    from llmos.remote import RemoteModel

    remotes = {"far": RemoteModel("far", "openai", backend.url + "/v1", tiny_llm.name)}
    s = make_server(tiny_llm, tmp_path_factory, api_key=KEY, max_body=20_000, remotes=remotes, max_len=512)
    yield s
    s.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def test_models(client, tiny_llm):
    ids = [m.id for m in client.models.list().data]
    assert ids == [tiny_llm.name, "far"]


def test_completions_n_seed_usage_logprobs(client, tiny_llm):
    kw = dict(model=tiny_llm.name, prompt="the cat", max_tokens=8, n=2, temperature=0.9, seed=5, logprobs=2)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len(a.choices) == 2 and a.usage.completion_tokens == 16
    assert a.usage.prompt_tokens == len(tiny_llm.tokenizer.encode("the cat"))
    lp = a.choices[0].logprobs
    assert len(lp.tokens) == 8 and len(lp.token_logprobs) == 8 and len(lp.top_logprobs[0]) == 2
    # the same request through the engine directly gives the same text
    direct = tiny_llm.generate("the cat", tiny_llm.sampling(max_tokens=8, temperature=0.9, seed=5), n=2)
    assert [c.text for c in direct.completions] == [c.text for c in a.choices]


def test_stop_strings(client, tiny_llm):
    full = client.completions.create(model=tiny_llm.name, prompt="the", max_tokens=30, temperature=0).choices[0].text
    stop = full[5:7]
    cut = client.completions.create(model=tiny_llm.name, prompt="the", max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_chat_streaming_matches_non_streaming(client, tiny_llm):
    messages = [{"role": "user", "content": "hello there"}]
    whole = client.chat.completions.create(model=tiny_llm.name, messages=messages, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=tiny_llm.name, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[0].choices[0].delta.role == "assistant"
    two = client.chat.completions.create(model=tiny_llm.name, messages=messages, max_tokens=6, n=2, temperature=1.0,
                                         seed=3, logprobs=True, top_logprobs=3)
    assert len(two.choices) == 2
    assert len(two.choices[0].logprobs.content[0].top_logprobs) == 3


def test_response_format_keeps_the_output_to_json(client, tiny_llm):
    schema = {"type": "object", "properties": {"title": {"type": "string"}, "stars": {"type": "integer"},
                                               "mood": {"enum": ["dark", "light"]}},
              "required": ["title", "stars", "mood"], "additionalProperties": False}
    messages = [{"role": "user", "content": "a book, as JSON"}]
    out = client.chat.completions.create(model=tiny_llm.name, messages=messages, max_tokens=120, temperature=1.0,
                                         seed=2, n=2, response_format={"type": "json_schema",
                                                                       "json_schema": {"name": "book", "schema": schema}})
    for choice in out.choices:
        assert choice.finish_reason == "stop", choice.message.content
        value = json.loads(choice.message.content)
        assert set(value) == {"title", "stars", "mood"} and isinstance(value["stars"], int)
        assert value["mood"] in ("dark", "light")
    any_object = client.completions.create(model=tiny_llm.name, prompt="a record:", max_tokens=60, temperature=0,
                                           extra_body={"response_format": {"type": "json_object"}}).choices[0]
    assert any_object.text.lstrip().startswith("{")  # an object, whole unless the budget ended it
    if any_object.finish_reason == "stop":
        assert isinstance(json.loads(any_object.text), dict)
    with pytest.raises(openai.BadRequestError, match="pattern"):
        client.chat.completions.create(model=tiny_llm.name, messages=messages, max_tokens=5, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "a+"}}})
    with pytest.raises(openai.BadRequestError, match="response_format type"):
        client.chat.completions.create(model=tiny_llm.name, messages=messages, max_tokens=5,
                                       response_format={"type": "yaml"})


def test_requests_join_the_running_batch(client, tiny_llm, server):
    scheduler = server.server.config.app.state.scheduler
    before = dict(scheduler.stats)

    def one(i):
        return client.completions.create(model=tiny_llm.name, prompt=f"story {i}", max_tokens=24, temperature=0.8, seed=i,
                                         logprobs=1)

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(6)))
    assert all(len(r.choices[0].text) > 0 for r in results)
    steps = scheduler.stats["steps"] - before["steps"]
    tokens = scheduler.stats["generated_tokens"] - before["generated_tokens"]
    assert tokens == 6 * 24
    assert steps < tokens * 0.6  # several sequences advanced per decode step
    # Joining a batch at its own position changes nothing: each request writes what it writes alone.
    for i, r in enumerate(results):
        alone = tiny_llm.generate(f"story {i}", tiny_llm.sampling(max_tokens=24, temperature=0.8, seed=i, logprobs=1))
        assert r.choices[0].text == alone.completions[0].text
        # the log-probabilities too: a tiny random model's tokens hardly depend on the context,
        # its log-probabilities do
        theirs = [lp.logprob for lp in alone.completions[0].logprobs]
        assert r.choices[0].logprobs.token_logprobs[: len(theirs)] == pytest.approx(theirs, abs=1e-4)


def raw(server, path, body=None, key=KEY, method="POST", content=None, headers=None):
    h = {"Authorization": f"Bearer {key}"} if key else {}
    h.update(headers or {})
    return httpx.request(method, server.url + path, json=body, content=content, headers=h, timeout=60)


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 99}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"abc": 500}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"999999": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-9"}, 404, "model"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("/api/write", {"task": "sonnetz", "brief": "x"}, 400, "task"),
    ("/api/write", {"task": "poem", "brief": "x", "form": "rondeau-ish"}, 400, "form"),
    ("/api/write", {"task": "poem", "brief": "x", "bogus": 1}, 400, "bogus"),
])
def test_invalid_requests_get_openai_errors(server, path, body, status, param):
    r = raw(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]


def test_prompt_too_long_body_limit_and_bad_json(server):
    r = raw(server, "/v1/completions", {"prompt": "the " * 600, "max_tokens": 4})
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]
    r = raw(server, "/v1/completions", {"prompt": "x" * 30_000})
    assert r.status_code == 413
    pieces = (b'{"prompt": "' + b"x" * 10_000 if i == 0 else b"x" * 10_000 for i in range(3))  # chunked: no length
    r = httpx.post(server.url + "/v1/completions", content=pieces, timeout=30,
                   headers={"content-type": "application/json", "authorization": f"Bearer {KEY}"})
    assert r.status_code == 413 and "body" in r.json()["error"]["message"]
    r = raw(server, "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400


def test_auth(server):
    assert raw(server, "/v1/models", key=None, method="GET").status_code == 401
    assert raw(server, "/v1/models", key="wrong", method="GET").status_code == 401
    assert raw(server, "/v1/models", method="GET").status_code == 200
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_queue_full_is_429(tiny_llm, tmp_path_factory):
    s = make_server(tiny_llm, tmp_path_factory, max_batch=1, max_queue=1)
    try:
        def call(i):
            return httpx.post(s.url + "/v1/completions", json={"prompt": "the", "max_tokens": 60, "seed": i}, timeout=120)

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(call, range(6)))
        codes = [r.status_code for r in answers]
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        for r in answers:
            if r.status_code == 429:
                assert r.headers.get("retry-after") == "1" and r.json()["error"]["type"] == "rate_limit_error"
    finally:
        s.stop()


def test_write_endpoint_with_a_form(server):
    r = raw(server, "/api/write", {"task": "poem", "brief": "春天", "form": "五言绝句", "n": 2, "seed": 1})
    assert r.status_code == 200, r.text
    cands = r.json()["candidates"]
    assert len(cands) == 2 and all(c["form_problems"] == [] for c in cands)
    r = raw(server, "/api/write", {"task": "story", "brief": "a fox", "max_tokens": 5, "stream": True})
    assert r.text.rstrip().endswith("data: [DONE]")


def test_metrics_embeddings_openapi(server, client, tiny_llm):
    e = client.embeddings.create(model=tiny_llm.name, input=["a cat", "a dog"])
    assert len(e.data) == 2 and len(e.data[0].embedding) == tiny_llm.model.config.d_model
    text = raw(server, "/metrics", method="GET").text
    assert "llmos_generation_tokens_total" in text and 'path="/v1/completions",status="200"' in text
    assert "llmos_time_to_first_token_seconds_count" in text and "llmos_queue_depth" in text
    spec = raw(server, "/openapi.json", method="GET").json()
    assert "/v1/chat/completions" in spec["paths"] and "/api/write" in spec["paths"]


def test_projects(server):
    r = raw(server, "/api/projects", {"name": "Tale", "data": {"text": "Once.", "memory": "A fox.", "lorebook": []}})
    pid = r.json()["id"]
    assert raw(server, f"/api/projects/{pid}", method="GET").json()["data"]["text"] == "Once."
    raw(server, f"/api/projects/{pid}", {"name": "Tale 2", "data": {"text": "Once upon."}}, method="PUT")
    md = raw(server, f"/api/projects/{pid}/export?format=md", method="GET").text
    assert md.startswith("# Tale 2") and "Once upon." in md
    assert pid in [p["id"] for p in raw(server, "/api/projects", method="GET").json()["projects"]]
    assert raw(server, f"/api/projects/{pid}", method="DELETE").status_code == 200
    assert raw(server, f"/api/projects/{pid}", method="GET").status_code == 404
    assert raw(server, "/api/projects", {"name": "x", "data": [1]}).status_code == 400


def test_remote_openai_model_through_the_server(client, tiny_llm):
    chat = dict(messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0)
    r = client.chat.completions.create(model="far", **chat)
    local = client.chat.completions.create(model=tiny_llm.name, **chat)  # the backend runs the same model
    assert r.model == "far" and r.choices[0].message.content == local.choices[0].message.content
    assert r.usage.completion_tokens == local.usage.completion_tokens > 0
    chunks = list(client.completions.create(model="far", prompt="the", max_tokens=5, stream=True, temperature=0))
    whole = client.completions.create(model=tiny_llm.name, prompt="the", max_tokens=5, temperature=0)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text


def test_remote_model_from_config_in_the_cli(backend, tiny_llm, tmp_path):
    (tmp_path / "config.yaml").write_text(
        f"models:\n  far:\n    type: openai\n    base_url: {backend.url}/v1\n    model: {tiny_llm.name}\n")
    env = {**os.environ, "LLMOS_HOME": str(tmp_path)}
    stats = backend.server.config.app.state.scheduler.stats
    before = dict(stats)
    proc = subprocess.run([sys.executable, "-m", "llmos", "write", "story", "a fox", "-m", "far", "--max-tokens", "6",
                           "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    stats = backend.server.config.app.state.scheduler.stats
    assert stats["requests"] == before["requests"] + 1  # written by the remote server, not locally
    assert 1 <= stats["generated_tokens"] - before["generated_tokens"] <= 6
    text = json.loads(proc.stdout)["completions"][0]["text"]
    assert isinstance(text, str) and text  # what the tiny random model wrote (here, blank lines)
    proc = subprocess.run([sys.executable, "-m", "llmos", "write", "poem", "x", "-m", "far", "--form", "haiku"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "local model" in proc.stderr


class FakeAnthropic(BaseHTTPRequestHandler):
    """The shape of Anthropic's messages API, enough to test the client against."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        assert self.path == "/v1/messages" and self.headers.get("anthropic-version")
        text = "echo: " + body["messages"][-1]["content"]
        if body.get("stream"):
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            for piece in (text[:5], text[5:]):
                event = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}
                self.wfile.write(f"event: content_block_delta\ndata: {json.dumps(event)}\n\n".encode())
            self.wfile.write(b'event: message_stop\ndata: {"type": "message_stop"}\n\n')
            return
        out = json.dumps({"content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                          "usage": {"input_tokens": 3, "output_tokens": 4}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *a):
        pass


def test_anthropic_messages_client(tiny_llm, tmp_path_factory):
    from llmos.remote import RemoteLLM, RemoteModel

    fake = ThreadingHTTPServer(("127.0.0.1", 0), FakeAnthropic)
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    try:
        remote = RemoteModel("claude", "anthropic", f"http://127.0.0.1:{fake.server_port}", "claude-x", "k")
        llm = RemoteLLM(remote)
        out = llm.generate([{"role": "user", "content": "hello"}], llm.sampling(max_tokens=10))
        assert out.completions[0].text == "echo: hello"
        s = make_server(tiny_llm, tmp_path_factory, remotes={"claude": remote})
        try:
            c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
            r = c.chat.completions.create(model="claude", messages=[{"role": "user", "content": "hey"}], max_tokens=5)
            assert r.choices[0].message.content == "echo: hey" and r.usage.total_tokens == 7
        finally:
            s.stop()
    finally:
        fake.shutdown()
