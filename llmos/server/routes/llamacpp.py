"""llama.cpp server's own API: POST /completion (server-sent events `data: {"content": ...}` when
streamed), /tokenize, /detokenize and GET /props. What SillyTavern's llama.cpp connection calls
(with n_probs for its token probabilities, in the newer `completion_probabilities` shape).

Errors come in llama.cpp's shape, {"error": {"code", "message", "type"}}.

Fields a llama.cpp client sends that LLMOS does not implement, and so ignores: cache_prompt
(LLMOS's prefix cache reuses a prompt's start on its own), id_slot, repeat_last_n,
dry_penalty_last_n, dry_sequence_breakers, mirostat, mirostat_tau, mirostat_eta, top_n_sigma,
dynatemp_range, dynatemp_exponent, penalize_nl, min_keep, t_max_predict_ms, n_indent,
timings_per_token, return_progress, response_fields, lora. In `samplers`, the samplers LLMOS
lacks (top_n_sigma, infill, ...) are dropped; "dry" and "penalties" both name the penalties step.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from fastapi import APIRouter, Request as HTTPRequest
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from llmos.server import protocol as P
from llmos.server.errors import APIError, native_errors
from llmos.server.state import state
from llmos.server.streaming import batches, finish, sse, submit

def llamacpp_error(status: int, message: str, kind: str) -> dict:
    kind = {404: "not_found_error", 429: "unavailable_error", 503: "unavailable_error"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"code": status, "message": message, "type": kind}}


router = APIRouter(tags=["llama.cpp-compatible"], route_class=native_errors(llamacpp_error))


class CompletionBody(BaseModel):
    """POST /completion: llama.cpp's completion request."""

    model_config = ConfigDict(extra="ignore")

    prompt: str | list[int] | list[str] = ""
    n_predict: int = Field(-1, ge=-1, description="Tokens to generate (-1: up to the server's limit).")
    stream: bool = False
    temperature: float | None = Field(None, ge=0)
    top_k: int | None = Field(None, ge=0, le=2**31 - 1)
    top_p: float | None = Field(None, ge=0, le=1)
    min_p: float | None = Field(None, ge=0, le=1)
    typical_p: float | None = Field(None, ge=0, le=1)
    tfs_z: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    dry_multiplier: float | None = Field(None, ge=0)
    dry_base: float | None = Field(None, ge=1)
    dry_allowed_length: int | None = Field(None, ge=1, le=2**31 - 1)
    xtc_probability: float | None = Field(None, ge=0, le=1)
    xtc_threshold: float | None = Field(None, ge=0, le=1)
    samplers: list[str] | str | None = Field(None, description="Sampler names in order, or llama.cpp's one-letter "
                                                                "string (not supported: send names).")
    seed: int | None = Field(None, ge=-1, le=2**63 - 1, description="-1: random.")
    stop: list[str] | None = Field(None, max_length=256)
    ignore_eos: bool = False
    logit_bias: list[list[Any]] | dict[str, Any] | None = Field(None, description="[[token id or text, bias or "
                                                                                   "false]], or {id: bias}.")
    n_probs: int = Field(0, ge=0, le=20, description="Most likely tokens to report at each step.")
    post_sampling_probs: bool = False
    return_tokens: bool = False
    n_keep: int = Field(0, ge=-1, description="Prompt tokens kept at the start when the prompt is cut (-1: all).")
    json_schema: dict[str, Any] | None = None
    grammar: str = ""


class TokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    content: str
    add_special: bool = False
    with_pieces: bool = False


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    tokens: list[int]


class Completion(BaseModel):
    index: int = 0
    content: str
    tokens: list[int] = []
    id_slot: int = 0
    stop: bool
    model: str | None = None
    tokens_predicted: int | None = None
    tokens_evaluated: int | None = None
    stop_type: str | None = None
    stopping_word: str | None = None
    truncated: bool | None = None
    tokens_cached: int | None = None
    prompt: str | None = None
    has_new_line: bool | None = None
    generation_settings: dict[str, Any] | None = None
    timings: dict[str, float] | None = None
    completion_probabilities: list[dict[str, Any]] | None = None


class Tokens(BaseModel):
    tokens: list[int] | list[dict[str, Any]]


class Content(BaseModel):
    content: str


class Props(BaseModel):
    default_generation_settings: dict[str, Any]
    total_slots: int
    model_path: str
    chat_template: str
    modalities: dict[str, bool]
    build_info: str


def _bias(llm, given) -> tuple[dict[int, float], list[list[int]]]:
    """logit_bias by token id or by text (each of its tokens), as [[key, bias]] or {key: bias};
    a bias of false bans the tokens."""
    vocab = llm.model.config.vocab_size
    pairs = given.items() if isinstance(given, dict) else given or []
    bias, banned = {}, []
    for pair in pairs:
        if isinstance(pair, list) and len(pair) != 2:
            raise APIError(400, f"logit_bias: each entry is [token id or text, bias], got {pair!r}", "logit_bias")
        key, value = pair
        if isinstance(key, str) and key.lstrip("-").isdigit() and isinstance(given, dict):
            key = int(key)
        ids = [key] if isinstance(key, int) and not isinstance(key, bool) else (
            llm.tokenizer.encode(key, add_bos=False) if isinstance(key, str) else None)
        if ids is None or any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"logit_bias: {key!r} is neither a token id of this model (0 to {vocab - 1}) nor a text",
                           "logit_bias")
        if value is False:
            banned += [[t] for t in ids]
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            bias.update((t, float(value)) for t in ids)
        else:
            raise APIError(400, f"logit_bias: the bias of {key!r} must be a number or false, got {value!r}", "logit_bias")
    return bias, banned


def completion_params(st, served, body: CompletionBody):
    llm = served.llm
    if body.grammar:
        raise APIError(400, "grammar (GBNF) is not supported here: send json_schema for JSON answers", "grammar")
    order = None
    if body.samplers is not None:
        if isinstance(body.samplers, str):
            raise APIError(400, "samplers: send a list of names (such as [\"top_k\", \"top_p\", \"temperature\"])",
                           "samplers")
        order = [s for s in body.samplers if s.lower() not in P.SAMPLERS_NOT_HERE] or None  # the engine knows the rest
    max_tokens = body.n_predict if body.n_predict > 0 else min(st.limits.max_tokens, served.scheduler.max_len)
    if body.n_predict == 0:
        raise APIError(400, "n_predict must be at least 1, or -1 (up to the server's limit)", "n_predict")
    st.check_max_tokens(max_tokens, "n_predict")
    bias, banned = _bias(llm, body.logit_bias)
    values = {"max_tokens": max_tokens, "temperature": body.temperature, "top_k": body.top_k,
              "top_p": body.top_p or None, "min_p": body.min_p, "typical_p": body.typical_p or None, "tfs": body.tfs_z,
              "repetition_penalty": body.repeat_penalty, "presence_penalty": body.presence_penalty,
              "frequency_penalty": body.frequency_penalty, "dry_multiplier": body.dry_multiplier,
              "dry_base": body.dry_base, "dry_allowed_length": body.dry_allowed_length,
              "xtc_probability": body.xtc_probability, "xtc_threshold": body.xtc_threshold, "sampler_order": order,
              "seed": body.seed if body.seed is not None and body.seed >= 0 else None,
              "logprobs": body.n_probs or None, "logit_bias": bias or None, "banned_sequences": banned or None}
    names = {"max_tokens": "n_predict", "typical_p": "typical_p", "repetition_penalty": "repeat_penalty",
             "tfs": "tfs_z", "sampler_order": "samplers", "logprobs": "n_probs"}
    try:
        params = P.native_sampling(llm, values, names)
    except ValueError as e:
        raise APIError(400, str(e).replace("sampler_order", "samplers")) from None
    if body.json_schema is not None:
        try:
            from llmos.writing.json_schema import json_constraint
        except ImportError:
            raise APIError(400, "json_schema is not supported yet by this server: leave it out", "json_schema") from None
        from dataclasses import replace

        try:
            params = replace(params, constraint=json_constraint(llm, body.json_schema))
        except ValueError as e:
            raise APIError(400, f"json_schema: {e}", "json_schema") from None
    return params


def _probabilities(tokenizer, lps, post_sampling: bool) -> list[dict]:
    """llama.cpp's completion_probabilities: each step's token and its most likely alternatives,
    as log-probabilities (or probabilities, with post_sampling_probs)."""

    def item(token, logprob):
        text = tokenizer.token_text(token)
        value = {"prob": math.exp(logprob)} if post_sampling else {"logprob": logprob}
        return {"id": token, "token": text, "bytes": list(text.encode()), **value}

    top = "top_probs" if post_sampling else "top_logprobs"
    return [{**item(lp.token, lp.logprob), top: [item(t, v) for t, v in lp.top]} for lp in lps if lp is not None]


def _prompt_ids(llm, prompt) -> list[int] | None:
    """Token ids sent as the prompt (None: the prompt is text)."""
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        vocab = llm.model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary (0 to {vocab - 1})", "prompt")
        return list(prompt)
    return None


@router.post("/completion", response_model=Completion, response_model_exclude_none=True,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": 'JSON, or server-sent events `data: {"content": ...}` with stream: true, '
                                             'the last with stop: true.'}})
async def completion(body: CompletionBody, http: HTTPRequest):
    st = state(http)
    served = await st.local(http, None, body.prompt if isinstance(body.prompt, str) else "")
    llm = served.llm
    params = completion_params(st, served, body)
    ids = _prompt_ids(llm, body.prompt)
    text = body.prompt if isinstance(body.prompt, str) else "".join(p for p in body.prompt if isinstance(p, str))
    if ids is None and not text:
        raise APIError(400, "prompt is empty: send text or token ids", "prompt")
    started = time.monotonic()
    try:
        req = await asyncio.to_thread(llm.request, text if ids is None else "", params, 1,
                                      [s for s in body.stop or [] if s], ignore_eos=body.ignore_eos, empty_ok=True)
    except ValueError as e:
        raise APIError(400, str(e), "prompt") from None
    if ids is not None:
        req.prompt = ids
    P.fit_prompt(req, served.scheduler.max_len, len(req.prompt) if body.n_keep == -1 else body.n_keep)
    await submit(served, req, st.request_timeout)

    def summary(reason) -> dict:
        t, seq = req.timings, req.sequences[0]
        hit = req.hook.cutters[0].hit
        stop_type = "limit" if reason == "length" else "word" if hit else "eos"
        predicted, evaluated = len(seq.output), len(req.prompt)
        return {"stop": True, "model": served.name, "tokens_predicted": predicted, "tokens_evaluated": evaluated,
                "stop_type": stop_type, "stopping_word": "", "truncated": bool(req.hook.truncated),
                "tokens_cached": evaluated + predicted, "id_slot": 0, "index": 0,
                "generation_settings": {"n_predict": params.max_tokens, "temperature": params.temperature,
                                        "top_k": params.top_k, "top_p": params.top_p, "min_p": params.min_p,
                                        "seed": params.seed if params.seed is not None else -1},
                "timings": {"prompt_n": evaluated, "prompt_ms": t.prefill_s * 1e3, "predicted_n": predicted,
                            "predicted_ms": t.decode_s * 1e3,
                            "predicted_per_second": predicted / t.decode_s if t.decode_s else 0.0,
                            "total_ms": (time.monotonic() - started) * 1e3}}

    if not body.stream:
        reasons = await finish(req, http)
        st.ended(req, llm)
        seq = req.sequences[0]
        content = req.hook.texts[0]
        out = {"content": content, "tokens": list(seq.output) if body.return_tokens else [], "prompt": text,
               "has_new_line": "\n" in content, **summary(reasons.get(0))}
        if body.n_probs:
            out["completion_probabilities"] = _probabilities(llm.tokenizer, seq.logprobs, body.post_sampling_probs)
        return out

    async def events():
        try:
            async for batch in batches(req, http):
                steps = [e for e in batch if e.finish_reason is None and (e.text or e.logprob is not None)]
                if steps:
                    chunk = {"index": 0, "content": "".join(e.text for e in steps), "stop": False, "id_slot": 0,
                             "tokens": [e.token for e in steps if e.token is not None] if body.return_tokens else []}
                    if body.n_probs:
                        chunk["completion_probabilities"] = _probabilities(llm.tokenizer, [e.logprob for e in steps],
                                                                           body.post_sampling_probs)
                    yield sse(chunk)
                ended = next((e for e in batch if e.finish_reason), None)
                if ended:
                    yield sse({"content": ended.text, **summary(ended.finish_reason)})
        except APIError as e:
            yield sse(llamacpp_error(e.status, e.message, e.kind))
        finally:
            st.ended(req, llm)

    return StreamingResponse(events(), media_type="text/event-stream")


@router.post("/tokenize", response_model=Tokens)
async def tokenize(body: TokenizeBody, http: HTTPRequest):
    tokenizer = state(http).primary.llm.tokenizer
    ids = await asyncio.to_thread(tokenizer.encode, body.content, body.add_special)
    if body.with_pieces:
        return {"tokens": [{"id": t, "piece": tokenizer.token_text(t)} for t in ids]}
    return {"tokens": ids}


@router.post("/detokenize", response_model=Content)
def detokenize(body: DetokenizeBody, http: HTTPRequest):
    llm = state(http).primary.llm
    vocab = llm.model.config.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"tokens: {bad[0]} is outside the vocabulary (0 to {vocab - 1})", "tokens")
    return {"content": llm.tokenizer.decode(body.tokens)}


@router.get("/props", response_model=Props)
def props(http: HTTPRequest):
    st = state(http)
    served = st.primary
    llm = served.llm
    return {"default_generation_settings": {"n_ctx": served.scheduler.max_len, "model": served.name,
                                            "params": {k: v for k, v in llm.defaults.items()
                                                       if isinstance(v, (int, float, str, bool))}},
            "total_slots": st.max_batch, "model_path": served.name, "chat_template": llm.tokenizer.chat_template or "",
            "modalities": {"vision": False, "audio": False}, "build_info": "llmos"}
