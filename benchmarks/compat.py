"""The compatibility table: each API front ends speak to a local server, exercised on a real
`llmos serve` the way its clients call it.

    python benchmarks/compat.py                                   # SmolLM2-135M-Instruct (pulled once)
    python benchmarks/compat.py --model PATH --out /tmp/c.json   # any model or checkpoint

The server runs in its own process on a free port on 127.0.0.1, without an API key (as
SillyTavern's Ollama and KoboldAI Classic connections expect). For each API: a whole answer, a
streamed one (its framing checked: SSE events, or one NDJSON object per HTTP chunk, whose text
must join up to the whole answer's at temperature 0), an abort (KoboldCpp's /api/extra/abort by
genkey; elsewhere the client going away) after which /metrics must show no running row and the
generation stopped within a few steps, and a bad request answered with a 4xx in the API's own
error shape. Clients: the official `ollama` package for Ollama; httpx with the request bodies
SillyTavern sends (docs/serving.md) for KoboldCpp, llama.cpp and the OpenAI text completion.
Prints the table and writes benchmarks/results/compat.json.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib.metadata import version

import httpx

from common import RESULTS, cpu_name, print_table, revision, write_json
from serve import Server

LONG = 400  # tokens asked for by the requests that are aborted

KOBOLD_BODY = {  # SillyTavern's KoboldAI Classic request, quirks included
    "prompt": "Once upon a time", "max_context_length": 2048, "max_length": 24, "rep_pen": 1.0, "rep_pen_range": 320,
    "temperature": 0, "tfs": 1, "top_a": 0, "top_k": 0, "top_p": 1, "min_p": 0, "typical": 1,
    "sampler_order": [6, 0, 1, 3, 4, 2, 5], "mirostat": 0, "grammar": "", "sampler_seed": 1, "stop_sequence": [],
    "banned_tokens": [], "logit_bias": [], "custom_token_bans": "", "dry_multiplier": 0,
    "dry_sequence_breakers": "[\"\\n\", \":\"]", "xtc_probability": 0, "trim_stop": True,
}
LLAMACPP_BODY = {  # SillyTavern's llama.cpp request
    "prompt": "Once upon a time", "n_predict": 24, "temperature": 0, "top_k": 0, "top_p": 1, "min_p": 0,
    "typical_p": 1, "repeat_penalty": 1, "cache_prompt": True, "n_probs": 2, "logit_bias": [], "seed": 1,
    "samplers": ["penalties", "dry", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature"],
}


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


def rows_freed(url: str, generated_before: float, timeout: float = 10.0) -> tuple[bool, int]:
    """Whether every row was freed after an abort, and how many tokens the aborted request got
    in all (of the LONG it asked for)."""
    deadline = time.time() + timeout
    while time.time() < deadline and metric(url, "llmos_running_sequences") > 0:
        time.sleep(0.05)
    freed = metric(url, "llmos_running_sequences") == 0
    return freed, int(metric(url, "llmos_generation_tokens_total") - generated_before)


def sse(text: str) -> list[dict]:
    return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:") and line[5:].strip() != "[DONE]"]


def check_kobold(url: str) -> dict:
    whole = httpx.post(url + "/api/v1/generate", json=KOBOLD_BODY, timeout=120).json()["results"][0]["text"]
    streamed = httpx.post(url + "/api/extra/generate/stream", json=KOBOLD_BODY, timeout=120)
    events = sse(streamed.text)
    stream_ok = "event: message" in streamed.text and "".join(e["token"] for e in events) == whole
    before = metric(url, "llmos_generation_tokens_total")
    body = {**KOBOLD_BODY, "max_length": LONG, "ban_eos_token": True, "genkey": "KCPPcompat"}
    chunks, answer = 0, None
    with httpx.stream("POST", url + "/api/extra/generate/stream", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                chunks += 1
                if chunks == 3:
                    answer = httpx.post(url + "/api/extra/abort", json={"genkey": "KCPPcompat"}, timeout=10).json()
    freed, generated = rows_freed(url, before)
    bad = httpx.post(url + "/api/v1/generate", json={"prompt": "x", "sampler_order": [9]}, timeout=10)
    count = httpx.post(url + "/api/extra/tokencount", json={"prompt": "Once upon a time"}, timeout=10).json()
    return {"api": "KoboldCpp / KoboldAI United", "client": "httpx, SillyTavern's KoboldAI Classic body",
            "routes": "/api/v1/generate, /api/extra/generate/stream, /api/extra/tokencount, /api/extra/abort",
            "generate": bool(whole), "streaming": stream_ok, "stream_format": "SSE event: message {token}",
            "abort": "POST /api/extra/abort {genkey}", "abort_ok": answer == {"success": "true", "done": "true"},
            "rows_freed": freed, "aborted_request_generated": generated,
            "error_shape_ok": bad.status_code == 400 and "msg" in bad.json().get("detail", {}),
            "extra_ok": count["value"] == len(count["ids"]) > 0}


def check_ollama(url: str, model: str) -> dict:
    import ollama

    client = ollama.Client(host=url)
    name = client.list().models[0].model
    options = {"num_predict": 24, "temperature": 0, "seed": 1, "num_ctx": 2048}
    whole = client.generate(model=name, prompt="Once upon a time", raw=True, options=options).response
    parts = list(client.generate(model=name, prompt="Once upon a time", raw=True, options=options, stream=True))
    chat = client.chat(model=name, messages=[{"role": "user", "content": "Say hello."}], options=options)
    body = {"model": name, "prompt": "Once upon a time", "raw": True, "keep_alive": -1, "options": options}
    with httpx.stream("POST", url + "/api/generate", json=body, timeout=120) as r:
        pieces = [p for p in r.iter_raw() if p]
    one_per_chunk = all(p.endswith(b"\n") and p.count(b"\n") == 1 for p in pieces)
    before = metric(url, "llmos_generation_tokens_total")
    stream = client.generate(model=name, prompt="Once upon a time", raw=True, stream=True,
                             options={"num_predict": LONG})
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    freed, generated = rows_freed(url, before)
    try:
        client.generate(model=name, prompt="x", options={"num_predcit": 5})
        error_ok = False
    except ollama.ResponseError as e:
        error_ok = e.status_code == 400 and "num_predcit" in e.error
    return {"api": "Ollama", "client": f"ollama {version('ollama')} (the official Python client)",
            "routes": "/api/generate, /api/chat, /api/tags, /api/show, /api/version",
            "generate": bool(whole) and bool(chat.message.content is not None),
            "streaming": one_per_chunk and "".join(p.response for p in parts) == whole,
            "stream_format": "NDJSON, one object per HTTP chunk", "abort": "client closes the stream",
            "abort_ok": True, "rows_freed": freed, "aborted_request_generated": generated, "error_shape_ok": error_ok,
            "extra_ok": client.show(name).details is not None}


def check_llamacpp(url: str) -> dict:
    whole = httpx.post(url + "/completion", json=LLAMACPP_BODY, timeout=120).json()
    events = sse(httpx.post(url + "/completion", json={**LLAMACPP_BODY, "stream": True}, timeout=120).text)
    stream_ok = events[-1]["stop"] and "".join(e["content"] for e in events) == whole["content"]
    probs_ok = all("top_logprobs" in p for p in whole["completion_probabilities"])
    before = metric(url, "llmos_generation_tokens_total")
    body = {**LLAMACPP_BODY, "n_predict": LONG, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/completion", json=body, timeout=120) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 4:
                break
    freed, generated = rows_freed(url, before)
    bad = httpx.post(url + "/completion", json={"prompt": "x", "samplers": ["warp"]}, timeout=10)
    tokens = httpx.post(url + "/tokenize", json={"content": "Once upon a time"}, timeout=10).json()["tokens"]
    back = httpx.post(url + "/detokenize", json={"tokens": tokens}, timeout=10).json()["content"]
    return {"api": "llama.cpp server", "client": "httpx, SillyTavern's llama.cpp body",
            "routes": "/completion, /tokenize, /detokenize, /props", "generate": bool(whole["content"]),
            "streaming": stream_ok, "stream_format": "SSE data: {content}", "abort": "client closes the stream",
            "abort_ok": True, "rows_freed": freed, "aborted_request_generated": generated,
            "error_shape_ok": bad.status_code == 400 and "message" in bad.json().get("error", {}),
            "extra_ok": probs_ok and back == "Once upon a time"}


def check_openai(url: str) -> dict:
    body = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "seed": 1}
    whole = httpx.post(url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
    events = sse(httpx.post(url + "/v1/completions", json={**body, "stream": True}, timeout=120).text)
    before = metric(url, "llmos_generation_tokens_total")
    with httpx.stream("POST", url + "/v1/completions", json={**body, "max_tokens": LONG, "ignore_eos": True,
                                                             "stream": True}, timeout=120) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 4:
                break
    freed, generated = rows_freed(url, before)
    bad = httpx.post(url + "/v1/completions", json={"prompt": "x", "temperature": 9}, timeout=10)
    return {"api": "OpenAI text completion", "client": "httpx, SillyTavern's Text Completion (Generic) body",
            "routes": "/v1/completions, /v1/models", "generate": bool(whole),
            "streaming": "".join(e["choices"][0]["text"] for e in events if e.get("choices")) == whole,
            "stream_format": "SSE data: {choices} ... [DONE]", "abort": "client closes the stream", "abort_ok": True,
            "rows_freed": freed, "aborted_request_generated": generated,
            "error_shape_ok": bad.status_code == 400 and "message" in bad.json().get("error", {}), "extra_ok": True}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--out", default=str(RESULTS / "compat.json"))
    args = ap.parse_args()
    server = Server(args.model, max_batch=4, precision=args.precision)
    try:
        server.wait_ready()
        url = server.url
        rows = [check_kobold(url), check_ollama(url, args.model), check_llamacpp(url), check_openai(url)]
    finally:
        server.stop()
    yes = {True: "yes", False: "NO"}
    print_table(["API", "client / request shape", "whole", "streaming", "abort", "rows freed", "tokens", "4xx shape"],
                [[r["api"], r["client"], yes[r["generate"] and r["extra_ok"]], f"{yes[r['streaming']]} ({r['stream_format']})",
                  f"{r['abort']}{'' if r['abort_ok'] else ' (refused)'}", yes[r["rows_freed"]],
                  f"{r['aborted_request_generated']}/{LONG}", yes[r["error_shape_ok"]]] for r in rows])
    write_json(args.out, {"model": args.model, "cpu": cpu_name(), "revision": revision(), "aborted_request_tokens": LONG,
                          "apis": rows})


if __name__ == "__main__":
    main()
