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
With --sillytavern DIR (an installed SillyTavern: `npm pack sillytavern@1.19.0`, unpack,
`npm install --omit=dev`), SillyTavern itself is started on another port and driven through its
own backend routes, as its page calls them: the connection check and a streamed generation for
its Ollama, llama.cpp and KoboldCpp text-completion connections and its KoboldAI Classic one,
then a generation its client leaves mid-stream (SillyTavern aborts upstream; the rows must be freed).
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


# The body SillyTavern 1.19's page sends its text-completion backends (createTextGenGenerationData in
# public/scripts/textgen-settings.js: every key it sets, at its default settings, greedy).
ST_TEXTGEN_BODY = {
    "max_new_tokens": 24, "max_tokens": 24, "temperature": 0, "top_p": 1, "typical_p": 1, "typical": 1,
    "sampler_seed": -1, "min_p": 0, "repetition_penalty": 1, "frequency_penalty": 0, "presence_penalty": 0,
    "top_k": 0, "skew": 0, "min_length": 0, "minimum_message_content_tokens": 0, "min_tokens": 0, "num_beams": 1,
    "length_penalty": 1, "early_stopping": False, "add_bos_token": True, "dynamic_temperature": False,
    "dynatemp_low": 0.75, "dynatemp_high": 1.25, "dynatemp_range": 0, "dynatemp_exponent": 1,
    "smoothing_factor": 0, "smoothing_curve": 1, "dry_allowed_length": 2, "dry_multiplier": 0, "dry_base": 1.75,
    "dry_sequence_breakers": "[\"\\n\", \":\", \"\\\"\", \"*\"]", "dry_penalty_last_n": 0, "max_tokens_second": 0,
    "sampler_priority": [], "samplers": ["penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc",
                                         "temperature"],
    "stopping_strings": [], "stop": [], "truncation_length": 2048, "ban_eos_token": False,
    "skip_special_tokens": True, "include_reasoning": True, "top_a": 0, "tfs": 1, "epsilon_cutoff": 0,
    "eta_cutoff": 0, "mirostat_mode": 0, "mirostat_tau": 5, "mirostat_eta": 0.1, "custom_token_bans": "",
    "banned_strings": [], "xtc_threshold": 0.1, "xtc_probability": 0, "nsigma": 0, "top_n_sigma": 0, "min_keep": 0,
    "rep_pen": 1, "rep_pen_range": 0, "repetition_penalty_range": 0, "encoder_repetition_penalty": 1,
    "no_repeat_ngram_size": 0, "penalty_alpha": 0, "temperature_last": True, "do_sample": True, "seed": 1,
    "guidance_scale": 1, "negative_prompt": "", "grammar_string": "", "repeat_penalty": 1, "repeat_last_n": 0,
    "n_predict": 24, "num_predict": 24, "num_ctx": 2048, "mirostat": 0, "ignore_eos": False, "logit_bias": [],
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


class SillyTavern:
    """SillyTavern's server (node server.js) on a free port of 127.0.0.1, and a session with its
    CSRF token, as its page has."""

    def __init__(self, folder: str):
        import subprocess

        from serve import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(["node", "server.js", "--listen", "false", "--port", str(self.port)], cwd=folder,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = httpx.Client(base_url=self.url, timeout=120)
        deadline = time.time() + 600  # its first start compiles the page's libraries
        while time.time() < deadline:
            try:
                token = self.client.get("/csrf-token").json()["token"]
                self.client.headers["X-CSRF-Token"] = token
                self.version = json.loads((__import__("pathlib").Path(folder) / "package.json").read_text())["version"]
                return
            except (httpx.HTTPError, ValueError, KeyError):
                time.sleep(1)
        raise SystemExit("SillyTavern did not start in time")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(20)


OLLAMA_KEYS = ("num_predict", "num_ctx", "num_batch", "stop", "temperature", "repeat_penalty", "presence_penalty",
               "frequency_penalty", "top_k", "top_p", "tfs_z", "typical_p", "seed", "repeat_last_n", "min_p")


def direct_answer(url: str, kind: str, body: dict) -> str:
    """The whole answer to what SillyTavern forwards (its Ollama options filtered by its
    OLLAMA_KEYS; the body as it is for the others), asked of the backend directly."""
    if kind == "ollama":
        forwarded = {"model": body["model"], "prompt": body["prompt"], "stream": False, "raw": True, "keep_alive": -1,
                     "options": {k: v for k, v in body.items() if k in OLLAMA_KEYS}}
        return httpx.post(url + "/api/generate", json=forwarded, timeout=300).json()["response"]
    if kind == "llamacpp":
        return httpx.post(url + "/completion", json={**body, "stream": False}, timeout=300).json()["content"]
    return httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=300).json()["choices"][0]["text"]


def check_sillytavern(st: SillyTavern, url: str) -> list[dict]:
    """SillyTavern's text-completion connections (Ollama, llama.cpp, KoboldCpp) and KoboldAI
    Classic, through its own backend: the status check, a streamed generation, a stream left."""
    rows = []
    common = {**ST_TEXTGEN_BODY, "prompt": "Once upon a time"}
    for kind, extra in (("ollama", {"num_predict": 24, "num_ctx": 2048}),
                        ("llamacpp", {"cache_prompt": True, "n_probs": 2}),
                        ("koboldcpp", {"sampler_order": [6, 0, 1, 3, 4, 2, 5], "trim_stop": True})):
        status = st.client.post("/api/backends/text-completions/status", json={"api_server": url, "api_type": kind})
        model = status.json().get("result") if status.status_code == 200 else None
        body = {**common, **extra, "api_server": url, "api_type": kind, "model": model, "stream": True}
        r = st.client.post("/api/backends/text-completions/generate", json=body)
        events = sse(r.text)
        text = "".join(e["content"] if "content" in e else (e.get("choices") or [{}])[0].get("text", "")
                       for e in events)
        direct = direct_answer(url, kind, body)
        before = metric(url, "llmos_generation_tokens_total")
        long = {**body, "num_predict": LONG, "n_predict": LONG, "max_tokens": LONG, "max_new_tokens": LONG,
                "ignore_eos": True, "ban_eos_token": True}
        with st.client.stream("POST", "/api/backends/text-completions/generate", json=long) as s:
            for i, _ in enumerate(s.iter_lines()):
                if i == 4:
                    break
        freed, generated = rows_freed(url, before)
        rows.append({"api": f"SillyTavern {st.version} → {dict(ollama='Ollama', llamacpp='llama.cpp', koboldcpp='KoboldCpp')[kind]}",
                     "client": "SillyTavern's server (its text-completion routes)",
                     "routes": {"ollama": "/api/tags, /api/generate", "llamacpp": "/v1/models, /completion",
                                "koboldcpp": "/v1/models, /v1/completions, /api/extra/abort"}[kind],
                     "generate": status.status_code == 200 and bool(model), "extra_ok": True,
                     "streaming": r.status_code == 200 and text == direct,
                     "stream_format": "its own SSE, from the backend's", "abort": "SillyTavern's client leaves",
                     "abort_ok": True, "rows_freed": freed, "aborted_request_generated": generated,
                     "error_shape_ok": None})
    kobold = url + "/api"
    status = st.client.post("/api/backends/kobold/status", json={"main_api": "kobold", "api_server": kobold}).json()
    body = {"api_server": kobold, "prompt": "Once upon a time", "max_length": 24, "max_context_length": 2048,
            "gui_settings": False, "rep_pen": 1, "rep_pen_range": 320, "temperature": 0, "top_k": 0, "top_p": 1,
            "tfs": 1, "top_a": 0, "typical": 1, "min_p": 0, "sampler_order": [6, 0, 1, 3, 4, 2, 5], "grammar": "",
            "sampler_seed": 1, "streaming": True, "can_abort": True}
    events = sse(st.client.post("/api/backends/kobold/generate", json=body).text)
    text = "".join(e.get("token", "") for e in events)
    whole = httpx.post(url + "/api/v1/generate", json={**KOBOLD_BODY, "max_length": 24}, timeout=120).json()
    before = metric(url, "llmos_generation_tokens_total")
    with st.client.stream("POST", "/api/backends/kobold/generate", json={**body, "max_length": LONG}) as s:
        for i, _ in enumerate(s.iter_lines()):
            if i == 4:
                break
    freed, generated = rows_freed(url, before)
    rows.append({"api": f"SillyTavern {st.version} → KoboldAI Classic", "client": "SillyTavern's server (its Kobold routes)",
                 "routes": "/api/v1/info/version, /api/extra/version, /api/v1/model, /api/extra/generate/stream, "
                           "/api/extra/abort",
                 "generate": status.get("koboldCppVersion") == "KoboldCpp" and bool(status.get("model")),
                 "extra_ok": True, "streaming": bool(text) and text == whole["results"][0]["text"],
                 "stream_format": "SSE event: message {token}, forwarded", "abort": "SillyTavern's client leaves "
                 "(it posts /api/extra/abort)", "abort_ok": True, "rows_freed": freed,
                 "aborted_request_generated": generated, "error_shape_ok": None})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--out", default=str(RESULTS / "compat.json"))
    ap.add_argument("--sillytavern", metavar="DIR", help="an installed SillyTavern, to drive it against the server too")
    args = ap.parse_args()
    server = Server(args.model, max_batch=4, precision=args.precision)
    st = None
    try:
        server.wait_ready()
        url = server.url
        rows = [check_kobold(url), check_ollama(url, args.model), check_llamacpp(url), check_openai(url)]
        if args.sillytavern:
            st = SillyTavern(args.sillytavern)
            rows += check_sillytavern(st, url)
    finally:
        server.stop()
        if st is not None:
            st.stop()
    yes = {True: "yes", False: "NO", None: "—"}  # —: not checked this way
    print_table(["API", "client / request shape", "whole", "streaming", "abort", "rows freed", "tokens", "4xx shape"],
                [[r["api"], r["client"], yes[r["generate"] and r["extra_ok"]], f"{yes[r['streaming']]} ({r['stream_format']})",
                  f"{r['abort']}{'' if r['abort_ok'] else ' (refused)'}", yes[r["rows_freed"]],
                  f"{r['aborted_request_generated']}/{LONG}", yes[r["error_shape_ok"]]] for r in rows])
    write_json(args.out, {"model": args.model, "cpu": cpu_name(), "revision": revision(), "aborted_request_tokens": LONG,
                          "apis": rows})


if __name__ == "__main__":
    main()
