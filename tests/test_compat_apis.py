"""The KoboldCpp, Ollama and llama.cpp APIs on a real server on 127.0.0.1: the official `ollama`
client, and httpx with the request shapes SillyTavern and KoboldAI Lite send (INTEROP.md).
Streaming, abort and disconnects, each API's own error shape, and no auth asked on loopback."""

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import ollama
import pytest

from helpers import ServerThread

# What SillyTavern 1.19's KoboldAI Classic connection sends (the quirks INTEROP.md lists included).
SILLYTAVERN_KOBOLD = {
    "prompt": "Once upon a time", "max_context_length": 512, "max_length": 12, "rep_pen": 1.1, "rep_pen_range": 320,
    "rep_pen_slope": 0.9, "temperature": 0.7, "tfs": 1, "top_a": 0, "top_k": 40, "top_p": 0.9, "min_p": 0.05,
    "typical": 1, "sampler_order": [6, 0, 1, 3, 4, 2, 5], "singleline": False, "use_default_badwordsids": False,
    "mirostat": 0, "mirostat_eta": 0.1, "mirostat_tau": 5, "grammar": "", "sampler_seed": 7, "stop_sequence": ["\nYou:"],
    "banned_tokens": [], "logit_bias": [], "custom_token_bans": "", "dry_multiplier": 0, "dry_base": 1.75,
    "dry_allowed_length": 2, "dry_sequence_breakers": "[\"\\n\", \":\", \"\\\"\", \"*\"]", "dry_penalty_last_n": 0,
    "xtc_threshold": 0.1, "xtc_probability": 0, "nsigma": 0, "trim_stop": True, "dynatemp_range": 0,
    "smoothing_factor": 0, "n": 1,
}


def slow_steps(s, seconds=0.01):
    """Each decode step takes at least `seconds`, as a larger model's would, so that a long
    request is still running when it is aborted or its client leaves."""
    engine = s.server.config.app.state.scheduler.engine
    step = engine.step

    def slow():
        time.sleep(seconds)
        return step()

    engine.step = slow
    return s


@pytest.fixture(scope="module")
def server(tiny_llm, tmp_path_factory):
    from llmos.db import Store
    from llmos.server.app import create_app

    s = ServerThread(create_app(tiny_llm, store=Store(tmp_path_factory.mktemp("db") / "llmos.db"), max_len=512,
                                max_tokens=500, multilingual=None))
    yield slow_steps(s)
    s.stop()


def post(server, path, body=None, **kw):
    return httpx.post(server.url + path, json=body, timeout=60, **kw)


def scheduler(server):
    return server.server.config.app.state.scheduler


def wait_idle(server, timeout=10.0):
    deadline = time.time() + timeout
    while scheduler(server).running and time.time() < deadline:
        time.sleep(0.02)
    return scheduler(server).running


def sse_data(text: str) -> list[dict]:
    return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]


# -- KoboldCpp ------------------------------------------------------------------------------------


def test_kobold_generate_stream_and_info(server, tiny_llm):
    r = post(server, "/api/v1/generate", SILLYTAVERN_KOBOLD)
    assert r.status_code == 200, r.text
    whole = r.json()["results"][0]
    assert whole["finish_reason"] in ("stop", "length") and isinstance(whole["text"], str)
    streamed = post(server, "/api/extra/generate/stream", SILLYTAVERN_KOBOLD)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert "event: message" in streamed.text
    events = sse_data(streamed.text)
    assert events[-1]["finish_reason"] in ("stop", "length") and all(e["finish_reason"] is None for e in events[:-1])
    assert "".join(e["token"] for e in events) == whole["text"]  # same seed, same text
    assert httpx.get(server.url + "/api/extra/version").json()["result"] == "KoboldCpp"  # turns streaming on
    assert httpx.get(server.url + "/api/v1/info/version").json() == {"result": "1.2.5"}
    assert httpx.get(server.url + "/api/v1/model").json() == {"result": tiny_llm.name}
    count = post(server, "/api/extra/tokencount", {"prompt": "Hello there"}).json()
    assert count == {"value": len(tiny_llm.tokenizer.encode("Hello there")), "ids": tiny_llm.tokenizer.encode("Hello there")}
    assert httpx.get(server.url + "/api/extra/true_max_context_length").json() == {"value": 512}


def test_kobold_banned_strings_and_token_bans(server, tiny_llm):
    base = {"prompt": "Hello", "max_length": 10, "temperature": 0}
    plain = post(server, "/api/v1/generate", base).json()["results"][0]["text"]
    assert "o" in plain  # the tiny model says "oooo"
    banned = post(server, "/api/v1/generate", {**base, "banned_tokens": ["o"]}).json()["results"][0]["text"]
    o = tiny_llm.tokenizer.encode("o", add_bos=False)[0]
    by_id = post(server, "/api/v1/generate", {**base, "custom_token_bans": f"{o}"}).json()["results"][0]["text"]
    assert "o" not in banned.lower() and "o" not in by_id


def test_kobold_abort_by_genkey_frees_the_rows_and_check_reads_the_text(server):
    body = {"prompt": "Hello", "max_length": 480, "ban_eos_token": True, "genkey": "KCPP1234"}
    received, aborted = "", False
    with httpx.stream("POST", server.url + "/api/extra/generate/stream", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                event = json.loads(line[5:])
                received += event["token"]
                if len(received) >= 3 and event["finish_reason"] is None and not aborted:
                    aborted = True
                    partial = post(server, "/api/extra/generate/check", {"genkey": "KCPP1234"}).json()
                    assert partial["results"][0]["text"].startswith(received)
                    assert post(server, "/api/extra/abort", {"genkey": "KCPP1234"}).json() == {"success": "true",
                                                                                              "done": "true"}
                if event["finish_reason"]:
                    break
    assert event["finish_reason"] == "stop" and len(received) < 480  # ended by the abort, not the length
    assert wait_idle(server) == 0
    assert post(server, "/api/extra/abort", {"genkey": "nobody"}).json()["success"] == "false"


@pytest.mark.parametrize("body, needle", [
    ({"prompt": "Hi", "sampler_order": [6, 0, 9]}, "unknown sampler 9"),
    ({"prompt": "Hi", "rep_pen": 0}, "rep_pen"),
    ({"prompt": "Hi", "top_p": 1.5}, "top_p"),
    ({"prompt": "Hi", "max_length": 100000}, "max_length"),
    ({"prompt": "Hi", "logit_bias": {"99999": 5}}, "logit_bias"),
    ({"prompt": "Hi", "grammar": "root ::= \"a\""}, "grammar"),
])
def test_kobold_bad_input_is_a_400_in_koboldais_shape(server, body, needle):
    r = post(server, "/api/v1/generate", body)
    assert r.status_code == 400
    detail = r.json()["detail"]
    assert detail["type"] == "bad_input" and needle in detail["msg"]


# -- Ollama ---------------------------------------------------------------------------------------


def test_ollama_client_generate_chat_tags_show(server, tiny_llm):
    client = ollama.Client(host=server.url)
    listed = client.list()
    assert [m.model for m in listed.models] == [tiny_llm.name]
    name = listed.models[0].model
    options = {"num_predict": 8, "temperature": 0, "seed": 3, "repeat_penalty": 1.0, "min_p": 0.0, "num_ctx": 256}
    whole = client.generate(model=name, prompt="Hello", raw=True, options=options)
    assert whole.done and whole.done_reason in ("stop", "length") and whole.eval_count == 8
    parts = list(client.generate(model=name + ":latest", prompt="Hello", raw=True, options=options, stream=True))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.response for p in parts) == whole.response
    chat = list(client.chat(model=name, messages=[{"role": "user", "content": "Hi"}], options=options, stream=True))
    assert chat[-1].done and all(p.message.role == "assistant" for p in chat)
    shown = client.show(name)
    assert shown.details.family == "llama" and shown.modelinfo["llama.context_length"] == 512
    assert httpx.get(server.url + "/api/version").json()["version"]


def test_ollama_stream_sends_each_object_in_its_own_chunk(server, tiny_llm):
    body = {"model": tiny_llm.name, "prompt": "Hello", "raw": True, "keep_alive": -1,
            "options": {"num_predict": 20, "temperature": 0.8, "stop": ["\n\n\n"]}}
    pieces = []
    with httpx.stream("POST", server.url + "/api/generate", json=body, timeout=60) as r:
        assert r.headers["content-type"] == "application/x-ndjson"
        pieces = [p for p in r.iter_raw() if p]
    assert len(pieces) > 2
    for piece in pieces:  # SillyTavern's parser loses text when several objects share a chunk
        assert piece.endswith(b"\n") and piece.count(b"\n") == 1
        json.loads(piece)


def test_ollama_client_that_leaves_frees_its_rows(server, tiny_llm):
    client = ollama.Client(host=server.url)
    before = scheduler(server).stats["generated_tokens"]
    stream = client.generate(model=tiny_llm.name, prompt="Hello", raw=True, stream=True,
                             options={"num_predict": 480})
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    assert wait_idle(server) == 0
    assert scheduler(server).stats["generated_tokens"] - before < 480


@pytest.mark.parametrize("kwargs, status, needle", [
    ({"options": {"num_predcit": 8}}, 400, "unknown option 'num_predcit'"),
    ({"options": {"temperature": -1}}, 400, "temperature"),
    ({"options": {"num_predict": 0}}, 400, "num_predict"),
    ({"model": "nope"}, 404, "'nope' not found"),
])
def test_ollama_bad_input_is_a_4xx_in_ollamas_shape(server, tiny_llm, kwargs, status, needle):
    client = ollama.Client(host=server.url)
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(**{"model": tiny_llm.name, "prompt": "Hi", **kwargs})
    assert err.value.status_code == status and needle in err.value.error
    raw = post(server, "/api/generate", {"model": tiny_llm.name, "prompt": "Hi", "stream": False, **kwargs})
    assert raw.status_code == status and set(raw.json()) == {"error"}


def test_ollama_ignores_the_options_it_documents_but_llmos_lacks(server, tiny_llm):
    r = post(server, "/api/generate", {"model": tiny_llm.name, "prompt": "Hi", "stream": False, "keep_alive": -1,
                                       "options": {"num_predict": 4, "repeat_last_n": 64, "mirostat": 0,
                                                   "num_batch": 512, "num_thread": 2, "tfs_z": 1}})
    assert r.status_code == 200 and r.json()["done"]


# -- llama.cpp ------------------------------------------------------------------------------------


def test_llamacpp_completion_probabilities_and_streaming(server, tiny_llm):
    body = {"prompt": "Hello", "n_predict": 6, "temperature": 0, "n_probs": 3, "cache_prompt": True, "n_keep": 0,
            "logit_bias": [], "samplers": ["penalties", "dry", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature"]}
    whole = post(server, "/completion", body).json()
    assert whole["stop"] and whole["tokens_predicted"] == 6 and whole["stop_type"] == "limit"
    probs = whole["completion_probabilities"]
    assert len(probs) == 6
    for step in probs:  # the newer shape SillyTavern 1.19 reads
        assert {"id", "token", "logprob", "bytes", "top_logprobs"} <= set(step) and len(step["top_logprobs"]) == 3
        assert step["logprob"] <= 0 and step["top_logprobs"][0]["logprob"] >= step["top_logprobs"][-1]["logprob"]
    assert "".join(p["token"] for p in probs) == whole["content"]
    streamed = sse_data(post(server, "/completion", {**body, "stream": True}).text)
    assert streamed[-1]["stop"] and not any(e["stop"] for e in streamed[:-1])
    assert "".join(e["content"] for e in streamed) == whole["content"]
    assert sum(len(e.get("completion_probabilities", [])) for e in streamed) == 6


def test_llamacpp_logit_bias_by_text_and_id_tokens_and_props(server, tiny_llm):
    o = tiny_llm.tokenizer.encode("o", add_bos=False)[0]
    for bias in ([["o", False]], [[o, -100]], {str(o): False}):
        text = post(server, "/completion", {"prompt": "Hello", "n_predict": 8, "temperature": 0,
                                            "logit_bias": bias}).json()["content"]
        assert "o" not in text, bias
    ids = post(server, "/tokenize", {"content": "Hello world"}).json()["tokens"]
    assert ids == tiny_llm.tokenizer.encode("Hello world", add_bos=False)
    assert post(server, "/detokenize", {"tokens": ids}).json() == {"content": "Hello world"}
    pieces = post(server, "/tokenize", {"content": "Hi", "with_pieces": True}).json()["tokens"]
    assert "".join(p["piece"] for p in pieces) == "Hi"
    from_ids = post(server, "/completion", {"prompt": ids, "n_predict": 3, "temperature": 0}).json()
    assert from_ids["tokens_evaluated"] == len(ids)
    props = httpx.get(server.url + "/props").json()
    assert props["default_generation_settings"]["n_ctx"] == 512 and props["total_slots"] >= 1


@pytest.mark.parametrize("body, needle", [
    ({"samplers": ["top_k", "warp"]}, "unknown sampler 'warp'"),
    ({"repeat_penalty": -1}, "repeat_penalty"),
    ({"n_probs": 50}, "n_probs"),
    ({"logit_bias": [[999999, 1]]}, "logit_bias"),
    ({"prompt": [999999]}, "outside the vocabulary"),
])
def test_llamacpp_bad_input_is_a_400_in_its_shape(server, body, needle):
    r = post(server, "/completion", {"prompt": "Hi", "n_predict": 2, **body})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == 400 and error["type"] == "invalid_request_error" and needle in error["message"]


# -- the gate: auth, metrics ----------------------------------------------------------------------


def raw_status(server, method: str, path: str, auth: str | None, body: bytes = b"") -> int:
    """The status of a request sent byte for byte (httpx refuses the header 'Bearer ', with its
    trailing space, which SillyTavern 1.19 sends)."""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nConnection: close\r\n"
    head += f"Authorization: {auth}\r\n" if auth is not None else ""
    head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head.encode() + body)
        return int(sock.makefile("rb").readline().split()[1])


@pytest.mark.parametrize("auth", ["Bearer ", "Bearer undefined", None])
def test_no_key_on_loopback_every_route_answers(server, auth):
    assert raw_status(server, "GET", "/api/tags", auth) == 200
    assert raw_status(server, "GET", "/api/v1/model", auth) == 200
    assert raw_status(server, "POST", "/completion", auth, b'{"prompt": "Hi", "n_predict": 2}') == 200
    assert raw_status(server, "POST", "/api/v1/generate", auth, b'{"prompt": "Hi", "max_length": 2}') == 200


def test_with_a_key_the_native_routes_need_it_and_count_in_metrics(tiny_llm, tmp_path_factory):
    from llmos.db import Store
    from llmos.server.app import create_app

    s = ServerThread(create_app(tiny_llm, store=Store(tmp_path_factory.mktemp("db") / "k.db"), api_key="k1",
                                multilingual=None))
    try:
        refused = post(s, "/api/generate", {"model": tiny_llm.name, "prompt": "Hi"})
        assert refused.status_code == 401 and "API key" in refused.json()["error"]  # Ollama's shape, from the gate
        refused = post(s, "/api/v1/generate", {"prompt": "Hi"})
        assert refused.status_code == 401 and "API key" in refused.json()["detail"]["msg"]  # KoboldCpp's
        refused = post(s, "/completion", {"prompt": "Hi"})
        assert refused.status_code == 401 and refused.json()["error"]["code"] == 401  # llama.cpp's
        bad_json = httpx.post(s.url + "/api/chat", content=b"{not json", timeout=30,
                              headers={"Authorization": "Bearer k1", "Content-Type": "application/json"})
        assert bad_json.status_code == 400 and isinstance(bad_json.json()["error"], str)
        ok = ollama.Client(host=s.url, headers={"Authorization": "Bearer k1"})
        assert ok.generate(model=tiny_llm.name, prompt="Hi", options={"num_predict": 2}).done
        metrics = httpx.get(s.url + "/metrics", headers={"Authorization": "Bearer k1"}).text
        assert 'llmos_requests_total{path="/api/generate",status="200"} 1' in metrics
    finally:
        s.stop()


# -- the samplers front ends send beyond OpenAI's: XTC, top-a, tail-free, the order ---------------


def test_kobold_top_a_xtc_and_sampler_order_reach_the_engine(server):
    base = {"prompt": "Hello", "max_length": 8, "sampler_seed": 5}
    greedy = post(server, "/api/v1/generate", {**base, "temperature": 0}).json()["results"][0]["text"]
    # top-a at 1 keeps only the most likely token (the tiny model is all but sure of it): greedy, however hot
    hot = {**base, "temperature": 1.5, "top_a": 1.0, "sampler_order": [6, 0, 1, 3, 4, 2, 5]}
    assert post(server, "/api/v1/generate", hot).json()["results"][0]["text"] == greedy
    # XTC that always fires, with every token a "top choice", leaves only the least likely of them
    xtc = {**base, "temperature": 1.0, "xtc_probability": 1.0, "xtc_threshold": 0.0}
    assert post(server, "/api/v1/generate", xtc).json()["results"][0]["text"] != greedy
    tfs = post(server, "/api/v1/generate", {**base, "temperature": 0.7, "tfs": 0.5, "sampler_order": [5, 3, 0]})
    assert tfs.status_code == 200, tfs.text
    bad = post(server, "/api/v1/generate", {**base, "xtc_probability": 1.5}).json()["detail"]
    assert "xtc_probability" in bad["msg"]


def test_ollama_and_llamacpp_new_samplers(server, tiny_llm):
    r = post(server, "/api/generate", {"model": tiny_llm.name, "prompt": "Hi", "stream": False,
                                       "options": {"num_predict": 4, "tfs_z": 0.9}})
    assert r.status_code == 200, r.text
    base = {"prompt": "Hello", "n_predict": 6, "seed": 2}
    greedy = post(server, "/completion", {**base, "temperature": 0}).json()["content"]
    ordered = post(server, "/completion", {**base, "temperature": 1.5, "top_k": 1,
                                           "samplers": ["top_k", "tfs_z", "temperature"]}).json()["content"]
    assert ordered == greedy  # top-k 1 first: the temperature after it has one token left to choose
    xtc = post(server, "/completion", {**base, "temperature": 1, "xtc_probability": 1, "xtc_threshold": 0})
    assert xtc.json()["content"] != greedy


# -- JSON answers: Ollama's format, llama.cpp's json_schema -----------------------------------------

SCHEMA = {"type": "object", "properties": {"done": {"type": "boolean"}, "mood": {"enum": ["calm", "wild"]}},
          "required": ["done", "mood"], "additionalProperties": False}


def test_ollama_format_and_llamacpp_json_schema_keep_the_answer_json(server, tiny_llm):
    from llmos.writing.json_schema import validate

    client = ollama.Client(host=server.url)
    for fmt in (SCHEMA, "json"):
        answer = client.generate(model=tiny_llm.name, prompt="Answer in JSON.", format=fmt,
                                 options={"num_predict": 120, "seed": 1}).response
        value = json.loads(answer)
        assert isinstance(value, dict) and (fmt == "json" or validate(value, SCHEMA) == [])
    parts = list(client.chat(model=tiny_llm.name, messages=[{"role": "user", "content": "JSON please"}], format=SCHEMA,
                             options={"num_predict": 120, "seed": 2}, stream=True))
    assert validate(json.loads("".join(p.message.content for p in parts)), SCHEMA) == []
    body = {"prompt": "Answer:", "n_predict": 120, "seed": 3, "json_schema": SCHEMA}
    assert validate(json.loads(post(server, "/completion", body).json()["content"]), SCHEMA) == []
    bad = post(server, "/completion", {**body, "json_schema": {"type": "object", "patternProperties": {"a": {}}}})
    assert bad.status_code == 400 and "json_schema" in bad.json()["error"]["message"]
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model=tiny_llm.name, prompt="x", format={"type": "nonsense"})
    assert err.value.status_code == 400 and "format" in err.value.error


def test_llamacpp_client_that_leaves_and_a_kobold_generate_aborted_from_elsewhere(server):
    before = scheduler(server).stats["generated_tokens"]
    with httpx.stream("POST", server.url + "/completion", timeout=60,
                      json={"prompt": "Hello", "n_predict": 480, "ignore_eos": True, "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 4:
                break
    assert wait_idle(server) == 0
    assert scheduler(server).stats["generated_tokens"] - before < 480
    # a whole (not streamed) KoboldCpp generation, aborted by its genkey from another connection
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, server, "/api/v1/generate",
                              {"prompt": "Hello", "max_length": 480, "ban_eos_token": True, "genkey": "KCPPwhole"})
        deadline = time.time() + 20
        while not post(server, "/api/extra/generate/check", {"genkey": "KCPPwhole"}).json()["results"][0]["text"]:
            assert time.time() < deadline
            time.sleep(0.02)
        assert post(server, "/api/extra/abort", {"genkey": "KCPPwhole"}).json()["success"] == "true"
        result = pending.result(timeout=30).json()["results"][0]
    assert result["finish_reason"] == "stop" and 0 < len(result["text"]) < 480  # what was written so far
    assert wait_idle(server) == 0
