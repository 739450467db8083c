"""Remote models: entries in $LLMOS_HOME/config.yaml that point at an OpenAI-compatible server
(another LLMOS, vLLM, Ollama, OpenAI) or at Anthropic's messages API, so that `write`, `chat`,
`generate` and the studio run on bigger models unchanged.

    models:
      big:
        type: openai                         # or: anthropic
        base_url: http://127.0.0.1:8001/v1
        model: smollm2-135m-instruct         # the name the remote server knows
        api_key_env: BIG_API_KEY             # or api_key: ... (optional)

The server's pass-through to these models is in llmos/server/proxy.py. A remote model has no local tokenizer: forms (which mask tokens) and banned-phrase lists need a
local model; everything else works through text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields

import yaml

from llmos.engine.sampling import SamplingParams
from llmos.settings import llmos_home

KINDS = ("openai", "anthropic")


class RemoteError(ValueError):
    pass


def config_path():
    return llmos_home() / "config.yaml"


@dataclass
class RemoteModel:
    name: str
    kind: str
    base_url: str
    model: str
    api_key: str | None = None
    timeout: float = 300.0

    def headers(self) -> dict:
        if self.kind == "anthropic":
            h = {"anthropic-version": "2023-06-01", "content-type": "application/json"}
            if self.api_key:
                h["x-api-key"] = self.api_key
            return h
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def anthropic_chat(self, messages: list[dict], params: SamplingParams) -> tuple[str, str, dict]:
        """One non-streamed reply from Anthropic's messages API: (text, finish reason, usage)."""
        import httpx

        payload = self._anthropic_payload(messages, params, stream=False)
        try:
            resp = httpx.post(f"{self.base_url.rstrip('/')}/v1/messages", json=payload, headers=self.headers(),
                              timeout=self.timeout)
        except httpx.HTTPError as e:
            raise RemoteError(f"remote model {self.name} at {self.base_url} is unreachable ({e})") from None
        if resp.status_code >= 400:
            raise RemoteError(f"{self.name}: {resp.status_code} {resp.text[:300]}")
        try:
            data = resp.json()
        except ValueError:
            raise RemoteError(f"{self.name} answered something that is not JSON: {resp.text[:300]}") from None
        text = "".join(b.get("text", "") for b in data.get("content", []) if b.get("type") == "text")
        reason = {"max_tokens": "length"}.get(data.get("stop_reason"), "stop")
        u = data.get("usage", {})
        usage = {"prompt_tokens": u.get("input_tokens", 0), "completion_tokens": u.get("output_tokens", 0),
                 "total_tokens": u.get("input_tokens", 0) + u.get("output_tokens", 0)}
        return text, reason, usage

    def _anthropic_payload(self, messages, params: SamplingParams, stream: bool, stop: list[str] | None = None) -> dict:
        system = "\n".join(m["content"] for m in messages if m["role"] == "system")
        turns = [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"]
        payload = {"model": self.model, "max_tokens": params.max_tokens, "messages": turns, "stream": stream}
        if system:
            payload["system"] = system
        if not params.greedy:
            payload["temperature"] = min(params.temperature, 1.0)
            if params.top_p < 1:
                payload["top_p"] = params.top_p
            if params.top_k:
                payload["top_k"] = params.top_k
        else:
            payload["temperature"] = 0.0
        if stop:
            payload["stop_sequences"] = stop
        return payload

    # -- synchronous streaming, for the CLI and the writing layer --

    def stream_chat(self, messages: list[dict], params: SamplingParams, stop: list[str] | None = None) -> Iterator[str]:
        if self.kind == "anthropic":
            payload = self._anthropic_payload(messages, params, True, stop)
            url = f"{self.base_url.rstrip('/')}/v1/messages"
        else:
            payload = {"model": self.model, "messages": messages, "stream": True, **_openai_params(params, stop)}
            url = f"{self.base_url.rstrip('/')}/chat/completions"
        yield from self._sse(url, payload, lambda d: _delta_text(d, self.kind, chat=True))

    def stream_completion(self, prompt: str, params: SamplingParams, stop: list[str] | None = None) -> Iterator[str]:
        if self.kind == "anthropic":  # no raw completions: the prompt becomes one user turn
            yield from self.stream_chat([{"role": "user", "content": prompt}], params, stop)
            return
        payload = {"model": self.model, "prompt": prompt, "stream": True, **_openai_params(params, stop)}
        yield from self._sse(f"{self.base_url.rstrip('/')}/completions", payload,
                             lambda d: _delta_text(d, self.kind, chat=False))

    def _sse(self, url: str, payload: dict, extract) -> Iterator[str]:
        import httpx

        try:
            with httpx.stream("POST", url, json=payload, headers=self.headers(), timeout=self.timeout) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise RemoteError(f"remote model {self.name} answered {resp.status_code}: {resp.text[:300]}")
                for line in resp.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    piece = extract(json.loads(data))
                    if piece:
                        yield piece
        except httpx.HTTPError as e:
            raise RemoteError(f"remote model {self.name} at {self.base_url} is unreachable ({e})") from None


def _openai_params(params: SamplingParams, stop) -> dict:
    out = {"max_tokens": params.max_tokens, "temperature": params.temperature, "top_p": params.top_p}
    if params.seed is not None:
        out["seed"] = params.seed
    if params.presence_penalty:
        out["presence_penalty"] = params.presence_penalty
    if params.frequency_penalty:
        out["frequency_penalty"] = params.frequency_penalty
    if stop:
        out["stop"] = stop[:4]
    return out


def params_from(body: dict) -> SamplingParams:
    """Sampling settings of an OpenAI-shaped request body, for a remote model."""
    return SamplingParams(max_tokens=body.get("max_tokens") or 256,
                          temperature=body.get("temperature") if body.get("temperature") is not None else 1.0,
                          top_p=body.get("top_p") or 1.0, top_k=body.get("top_k") or 0)


def _delta_text(d: dict, kind: str, chat: bool) -> str:
    if kind == "anthropic":
        if d.get("type") == "content_block_delta":
            return d.get("delta", {}).get("text", "")
        return ""
    choices = d.get("choices") or []
    if not choices:
        return ""
    return (choices[0].get("delta") or {}).get("content") or "" if chat else choices[0].get("text") or ""


def load_remotes() -> dict[str, RemoteModel]:
    path = config_path()
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RemoteError(f"{path} is not valid YAML: {e}") from None
    entries = data.get("models") or {}
    if not isinstance(entries, dict):
        raise RemoteError(f"{path}: 'models' must be a mapping of name -> settings")
    out = {}
    known = {f.name for f in fields(RemoteModel)} | {"type", "api_key_env"}
    for name, e in entries.items():
        if not isinstance(e, dict):
            raise RemoteError(f"{path}: model {name!r} must be a mapping")
        unknown = set(e) - known
        if unknown:
            raise RemoteError(f"{path}: model {name!r} has unknown field(s) {', '.join(sorted(unknown))}")
        kind = e.get("type", "openai")
        if kind not in KINDS:
            raise RemoteError(f"{path}: model {name!r}: type must be one of {', '.join(KINDS)}")
        if not e.get("base_url") or not e.get("model"):
            raise RemoteError(f"{path}: model {name!r} needs base_url and model")
        key = e.get("api_key") or (os.environ.get(e["api_key_env"]) if e.get("api_key_env") else None)
        out[str(name)] = RemoteModel(str(name), kind, str(e["base_url"]), str(e["model"]), key,
                                     float(e.get("timeout", 300)))
    return out


class RemoteLLM:
    """The LLM interface (stream / generate / sampling) over a remote model."""

    tokenizer = None
    context_window = 10**9

    def __init__(self, remote: RemoteModel):
        self.remote = remote
        self.defaults: dict = {}
        self.loaded = type("Loaded", (), {"load_seconds": 0.0, "meta": {}})()

    @property
    def name(self) -> str:
        return self.remote.name

    def sampling(self, **overrides) -> SamplingParams:
        keep = {f.name for f in fields(SamplingParams)} - {"constraint", "banned_sequences", "logit_bias"}
        return SamplingParams(**{k: v for k, v in overrides.items() if v is not None and k in keep})

    def stream(self, prompt, params: SamplingParams | None = None, n: int = 1, stop=None, chat=None,
               truncate: str = "error", result=None):
        from llmos.llm import Completion, Delta

        params = params or self.sampling()
        if params.constraint is not None:
            raise RemoteError("forms are kept by masking tokens, which needs a local model; use -m with a local one")
        texts = []
        for i in range(n):
            seeded = params if params.seed is None else type(params)(**{**params.__dict__, "seed": params.seed + i})
            if isinstance(prompt, list) or chat:
                messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
                pieces = self.remote.stream_chat(messages, seeded, stop)
            else:
                pieces = self.remote.stream_completion(prompt, seeded, stop)
            text = ""
            for piece in pieces:
                text += piece
                yield Delta(i, piece)
            texts.append(text)
        if result is not None:
            result.prompt = prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)
            result.completions = [Completion(i, t, [], "stop") for i, t in enumerate(texts)]
            result.timings = {}

    def generate(self, prompt, params=None, n: int = 1, stop=None, chat=None, truncate: str = "error"):
        from llmos.llm import Result

        result = Result("", 0, [])
        for _ in self.stream(prompt, params, n, stop, chat, truncate, result):
            pass
        return result
