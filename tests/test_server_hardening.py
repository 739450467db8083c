"""`llmos serve` against a hostile or careless client: abandoned work stops, every endpoint is
bounded, a web page cannot drive the server, and bad input is a 4xx with an error object.
Each test drives a real server on 127.0.0.1."""

import json
import re
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from helpers import ServerThread

KEY = "hardening-key"


def make(tiny_llm, tmp_path_factory, **kw):
    from llmos.db import Store
    from llmos.server.app import create_app

    store = Store(tmp_path_factory.mktemp("db") / "llmos.db")
    kw.setdefault("multilingual", None)
    return ServerThread(create_app(tiny_llm, store=store, **kw))


def slow_steps(s, seconds=0.01):
    """Make each decode step of a server take at least `seconds`, as a larger model's would, so
    that a long request is still running when its client leaves."""
    engine = s.server.config.app.state.scheduler.engine
    step = engine.step

    def slow():
        time.sleep(seconds)
        return step()

    engine.step = slow
    return s


@pytest.fixture(scope="module")
def server(tiny_llm, tmp_path_factory):
    s = slow_steps(make(tiny_llm, tmp_path_factory, max_len=512, max_tokens=500, max_embedding_inputs=8,
                        max_embedding_tokens=400))
    yield s
    s.stop()


def post(server, path, body=None, timeout=60, **kw):
    return httpx.post(server.url + path, json=body, timeout=timeout, **kw)


def scheduler(server):
    return server.server.config.app.state.scheduler


def generated(server) -> int:
    return scheduler(server).stats["generated_tokens"]


def wait_idle(server, seconds=10) -> float:
    """Seconds until no row is in use (or the limit)."""
    t0 = time.time()
    while scheduler(server).running and time.time() - t0 < seconds:
        time.sleep(0.02)
    return time.time() - t0


# -- abandoned work ---------------------------------------------------------------------------

LONG = {"prompt": "the", "max_tokens": 480, "ignore_eos": True, "temperature": 0}


def test_a_non_streamed_request_whose_client_leaves_is_cancelled(server):
    before = generated(server)
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/completions", LONG, timeout=1.0)
    at_leave = generated(server)
    assert 0 < at_leave - before < 400, "the request should still have been running when the client left"
    wait_idle(server)
    assert scheduler(server).running == 0
    # freed within a step or two of the disconnect, not run on to its 480 tokens
    assert generated(server) - at_leave <= 5


def test_a_stream_whose_client_leaves_is_cancelled(server):
    before = generated(server)
    with httpx.stream("POST", server.url + "/v1/completions", json={**LONG, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and generated(server) - before > 20:
                break
    at_leave = generated(server)
    wait_idle(server)
    assert scheduler(server).running == 0
    assert generated(server) - at_leave <= 5


def test_a_chat_turn_whose_client_leaves_is_cancelled(server):
    sid = post(server, "/api/chat/sessions", {}).json()["id"]
    before = generated(server)
    with pytest.raises(httpx.ReadTimeout):
        post(server, f"/api/chat/sessions/{sid}/messages", {"content": "tell me a long story", "max_tokens": 480,
                                                             "temperature": 1.0}, timeout=1.5)
    at_leave = generated(server)
    assert at_leave > before
    wait_idle(server)
    assert scheduler(server).running == 0
    assert generated(server) - at_leave <= 5


def test_max_tokens_cap(server):
    r = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 501})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert "501" in r.json()["error"]["message"] and "--max-tokens" in r.json()["error"]["message"]
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 9999})
    assert r.status_code == 400
    r = post(server, "/api/write", {"task": "story", "brief": "x", "max_tokens": 1000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert post(server, "/v1/completions", {"prompt": "x", "max_tokens": 3}).status_code == 200


def test_tokens_in_flight_are_capped_and_released(tiny_llm, tmp_path_factory):
    s = slow_steps(make(tiny_llm, tmp_path_factory, max_len=512, max_tokens_in_flight=600))
    try:
        holding = {**LONG, "max_tokens": 400, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=holding, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            assert scheduler(s).tokens_in_flight == len(tiny_llm.tokenizer.encode("the")) + 400
            busy = post(s, "/v1/completions", {"prompt": "the", "max_tokens": 300})
            assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["type"] == "rate_limit_error"
            small = post(s, "/v1/completions", {"prompt": "the", "max_tokens": 50})  # fits beside it
            assert small.status_code == 200
        wait_idle(s)
        assert scheduler(s).tokens_in_flight == 0
        assert post(s, "/v1/completions", {"prompt": "the", "max_tokens": 300}).status_code == 200
        assert "llmos_tokens_in_flight 0" in httpx.get(s.url + "/metrics").text
    finally:
        s.stop()


# -- embeddings ---------------------------------------------------------------------------------


def test_embeddings_are_bounded(server, tiny_llm):
    too_many = post(server, "/v1/embeddings", {"input": ["a"] * 9})
    assert too_many.status_code == 400 and "at most 8" in too_many.json()["error"]["message"]
    too_long = post(server, "/v1/embeddings", {"input": ["word " * 100] * 5})
    assert too_long.status_code == 400 and "at most 400" in too_long.json()["error"]["message"]
    over_context = post(server, "/v1/embeddings", {"input": "word " * 600})
    assert over_context.status_code == 400 and "input[0]" in over_context.json()["error"]["message"]
    # the body that once took a tiny model's server from 0.4 to 1.8 GB: refused before any model work
    huge = post(server, "/v1/embeddings", {"input": ["lorem ipsum dolor " * 40] * 1000})
    assert huge.status_code == 400


def test_embeddings_run_in_pieces_on_the_scheduler(server, tiny_llm, monkeypatch):
    from llmos.server.routes import openai as routes

    monkeypatch.setattr(routes, "EMBED_PIECE_TOKENS", 8)  # several pieces for a few short texts
    texts = ["a cat", "the dog sat down", "x", "a long and winding road to the sea"]
    runs = []
    real_run = scheduler(server).run
    monkeypatch.setattr(scheduler(server), "run", lambda pieces: runs.append(len(pieces)) or real_run(pieces))
    r = post(server, "/v1/embeddings", {"input": texts})
    assert r.status_code == 200, r.text
    assert runs and runs[0] >= 3
    got = [d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d["index"])]
    want = tiny_llm.embed(texts).tolist()
    for g, w in zip(got, want, strict=True):  # each vector back in its input's place
        assert g == pytest.approx(w, abs=1e-4)


def test_embeddings_queue_like_generation(tiny_llm, tmp_path_factory):
    s = make(tiny_llm, tmp_path_factory, max_queue=0)
    try:
        r = post(s, "/v1/embeddings", {"input": "a cat"})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    finally:
        s.stop()


# -- a web page cannot drive the server ---------------------------------------------------------


def test_only_loopback_host_names_are_served(server):
    port = server.port
    assert httpx.get(f"{server.url}/v1/models", headers={"Host": f"localhost:{port}"}).status_code == 200
    assert httpx.get(f"{server.url}/v1/models", headers={"Host": f"[::1]:{port}"}).status_code == 200
    rebound = httpx.get(f"{server.url}/api/projects", headers={"Host": f"attacker.example:{port}"})
    assert rebound.status_code == 403 and "--allowed-host" in rebound.json()["error"]["message"]


def test_allowed_host_and_any_host(tiny_llm, tmp_path_factory):
    from llmos.server.gate import LOOPBACK_HOSTS

    s = make(tiny_llm, tmp_path_factory, allowed_hosts=LOOPBACK_HOSTS | {"studio.lan"})
    try:
        assert httpx.get(s.url + "/v1/models", headers={"Host": "studio.lan"}).status_code == 200
        assert httpx.get(s.url + "/v1/models", headers={"Host": "other.lan"}).status_code == 403
    finally:
        s.stop()
    s = make(tiny_llm, tmp_path_factory, allowed_hosts=None)  # as served beyond loopback
    try:
        assert httpx.get(s.url + "/v1/models", headers={"Host": "other.lan"}).status_code == 200
        project = {"name": "x", "data": {}}
        same = post(s, "/api/projects", project, headers={"Host": "box.lan:8000", "Origin": "http://box.lan:8000"})
        assert same.status_code == 200  # the studio, opened at the machine's own name
        foreign = post(s, "/api/projects", project, headers={"Host": "box.lan:8000", "Origin": "http://evil.test"})
        assert foreign.status_code == 403
    finally:
        s.stop()


def test_cross_site_writes_are_refused(server):
    project = {"name": "x", "data": {}}
    # a form or text/plain POST (no CORS preflight): refused for its content type
    plain = httpx.post(server.url + "/api/projects", content=json.dumps(project), headers={"Content-Type": "text/plain"})
    assert plain.status_code == 415 and "application/json" in plain.json()["error"]["message"]
    form = httpx.post(server.url + "/api/projects", data={"name": "x"})
    assert form.status_code == 415
    # a foreign Origin on anything that changes state
    foreign = post(server, "/api/projects", project, headers={"Origin": "https://attacker.example"})
    assert foreign.status_code == 403
    assert post(server, "/api/projects", project, headers={"Origin": "null"}).status_code == 403
    pid = post(server, "/api/projects", project, headers={"Origin": server.url}).json()["id"]  # the studio itself
    gone = httpx.delete(f"{server.url}/api/projects/{pid}", headers={"Origin": "http://evil.test"})
    assert gone.status_code == 403
    assert httpx.get(f"{server.url}/api/projects/{pid}").status_code == 200
    names = [p["name"] for p in httpx.get(server.url + "/api/projects").json()["projects"]]
    assert names.count("x") == 1  # only the same-origin POST created one


def test_a_key_guards_everything_but_health(tiny_llm, tmp_path_factory):
    s = make(tiny_llm, tmp_path_factory, api_key=KEY)
    try:
        for path in ("/metrics", "/docs", "/openapi.json", "/redoc", "/v1/models", "/api/projects"):
            assert httpx.get(s.url + path).status_code == 401, path
            assert httpx.get(s.url + path, headers={"Authorization": f"Bearer {KEY}x"}).status_code == 401, path
            assert httpx.get(s.url + path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200, path
        assert httpx.get(s.url + "/health").status_code == 200
        assert httpx.get(s.url + "/").status_code == 200  # the studio page asks for the key itself
    finally:
        s.stop()


def test_serving_beyond_loopback_needs_a_key(tmp_path):
    env = {"LLMOS_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "COLUMNS": "120"}
    proc = subprocess.run([sys.executable, "-m", "llmos", "serve", "--host", "0.0.0.0", "-m", "nonexistent"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "--api-key" in proc.stderr and "--insecure" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- bad input is a 4xx --------------------------------------------------------------------------

BAD = [
    ("/v1/completions", b'{"prompt": "a \\ud800 b"}'),  # a lone surrogate
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}'),
    ("/api/projects", b'{"name": "\\ud83d", "data": {}}'),
    ("/v1/completions", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"),  # deeply nested
    ("/api/projects", b'{"name": "x", "data": ' + b'{"a": ' * 3000 + b"1" + b"}" * 3000 + b"}"),
    ("/v1/completions", b'{"prompt": "x", "seed": 99999999999999999999999999}'),
    ("/v1/completions", b'{"prompt": "x", "seed": -99999999999999999999999999}'),
    ("/v1/completions", b'{"prompt": "x", "top_k": 1000000000000000000000}'),
    ("/v1/completions", b'{"prompt": "x", "logit_bias": {' + b", ".join(b'"%d": 1' % i for i in range(400)) + b'}}'),
    ("/v1/completions", b'{"prompt": "x", "n": 100000000000000000000}'),
    ("/v1/completions", b'{"prompt": "x", "logit_bias": {"99999999999999999999999": 5}}'),
    ("/v1/completions", b'{"prompt": "x", "logit_bias": {"-1": 5}}'),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 1e400}'),
    ("/v1/completions", b'{"prompt": "x", "temperature": "hot"}'),
    ("/v1/completions", b'{"prompt": ["a", "b"]}'),
    ("/v1/completions", b'{"prompt": []}'),
    ("/v1/completions", b'{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}'),
    ("/v1/completions", b'{"prompt": "x", "ban": ["' + b'", "'.join([b"w"] * 20000) + b'"]}'),
    ("/v1/chat/completions", b'{"messages": "hello"}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}'),
    ("/v1/embeddings", b'{"input": [1, 2, 3]}'),
    ("/v1/embeddings", b'{"input": []}'),
    ("/api/write", b'{"task": "poem", "brief": "x", "n": 0}'),
    ("/api/write", b'{"task": "poem", "brief": "x", "seed": 1e30}'),
    ("/api/story/continue", b'{"text": "x", "lorebook": [{"keys": "a", "content": 1}]}'),
    ("/api/chat/sessions", b'{"persona": 5}'),
    ("/api/chat/sessions", b'[]'),
    ("/v1/completions", b'null'),
    ("/v1/completions", b'"just a string"'),
    ("/v1/completions", b'\xff\xfe not utf-8'),
]


@pytest.mark.parametrize("path, body", BAD, ids=[f"{p}-{i}" for i, (p, _) in enumerate(BAD)])
def test_bad_input_is_a_4xx_with_an_error_object(server, path, body):
    r = httpx.post(server.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=60)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert err["message"] and err["type"]
    assert httpx.get(server.url + "/health").status_code == 200  # and the server is still there


def test_extreme_but_valid_numbers_still_work(server):
    for body in ({"prompt": "x", "seed": 2**63 - 1, "max_tokens": 2}, {"prompt": "x", "seed": -(2**63), "max_tokens": 2},
                 {"prompt": "x", "top_k": 10**9, "max_tokens": 2}, {"prompt": "x", "logit_bias": {"5": -100}, "max_tokens": 2}):
        r = post(server, "/v1/completions", body)
        assert r.status_code == 200, (body, r.text)


# -- metrics ------------------------------------------------------------------------------------


def test_metrics_are_labelled_by_route_template(server):
    for i in range(200):
        httpx.get(f"{server.url}/no/such/path/{i}")
    httpx.get(server.url + "/weird%22path%0Abreak")
    for pid in (101, 102, 103):
        httpx.get(f"{server.url}/api/projects/{pid}")
    text = httpx.get(server.url + "/metrics").text
    lines = [line for line in text.splitlines() if line.startswith("llmos_requests_total")]
    assert 'llmos_requests_total{path="/api/projects/{project_id}",status="404"} 3' in lines
    unmatched = [line for line in lines if 'path="(unmatched)"' in line]
    assert len(unmatched) == 1 and unmatched[0].endswith(" 201")
    assert len(text) < 20_000
    sample = re.compile(r'^[a-z_]+(\{([a-z_]+="([^"\\\n]|\\.)*",?)*\})? [0-9.e+-]+$')
    for line in text.splitlines():
        assert line.startswith("# TYPE ") or sample.match(line), line


def test_metrics_label_values_are_escaped():
    from llmos.server.metrics import label

    assert label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


# -- remote models ----------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_remote_is_a_502_streamed_or_not(tiny_llm, tmp_path_factory):
    from llmos.remote import RemoteModel

    port = closed_port()
    remotes = {"gone": RemoteModel("gone", "openai", f"http://127.0.0.1:{port}/v1", "m"),
               "gone-claude": RemoteModel("gone-claude", "anthropic", f"http://127.0.0.1:{port}", "c", "k")}
    s = make(tiny_llm, tmp_path_factory, remotes=remotes)
    try:
        for model in remotes:
            chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
            for stream in (False, True):
                r = post(s, "/v1/chat/completions", {**chat, "stream": stream})
                assert r.status_code == 502, (model, stream, r.text)
                assert "gone" in r.json()["error"]["message"]
        r = post(s, "/v1/completions", {"model": "gone", "prompt": "x", "stream": True})
        assert r.status_code == 502
    finally:
        s.stop()


def test_the_remote_client_is_closed_when_the_stream_is_left(tiny_llm, tmp_path_factory, monkeypatch):
    from llmos.remote import RemoteModel

    backend = slow_steps(make(tiny_llm, tmp_path_factory))
    closed = []
    real_aclose = httpx.AsyncClient.aclose

    async def aclose(self):
        closed.append(self)
        await real_aclose(self)

    monkeypatch.setattr(httpx.AsyncClient, "aclose", aclose)
    s = make(tiny_llm, tmp_path_factory, remotes={"far": RemoteModel("far", "openai", backend.url + "/v1", tiny_llm.name)})
    try:
        body = {"model": "far", "prompt": "the", "max_tokens": 300, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            next(line for line in r.iter_lines() if line.startswith("data:"))
        deadline = time.time() + 10
        while not closed and time.time() < deadline:
            time.sleep(0.05)
        assert closed
        assert wait_idle(backend) < 10 and scheduler(backend).running == 0  # the backend's row was freed too
    finally:
        s.stop()
        backend.stop()


# -- the event loop stays free ---------------------------------------------------------------


def test_tokenizing_a_long_prompt_does_not_stall_other_streams(server, tiny_llm, monkeypatch):
    tok = tiny_llm.tokenizer
    real = tok.encode

    def slow(text, *a, **kw):
        if "SLOWPROMPT" in text:
            time.sleep(2.0)  # a long prompt's tokenization, made long on purpose
        return real(text, *a, **kw)

    monkeypatch.setattr(tok, "encode", slow)
    arrivals = []
    started = threading.Event()

    def slow_request():
        started.wait()
        post(server, "/v1/completions", {"prompt": "SLOWPROMPT the", "max_tokens": 2})

    t = threading.Thread(target=slow_request)
    t.start()
    with httpx.stream("POST", server.url + "/v1/completions", json={**LONG, "max_tokens": 200, "stream": True},
                      timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                arrivals.append(time.monotonic())
                if len(arrivals) == 5:
                    started.set()
    t.join()
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert len(arrivals) > 100 and max(gaps) < 1.0, max(gaps)
