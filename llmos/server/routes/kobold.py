"""KoboldCpp's API (the KoboldAI United API and KoboldCpp's /api/extra routes): what SillyTavern's
KoboldAI Classic connection, KoboldAI Lite and other Kobold front ends call.

Errors come in KoboldAI's shape, {"detail": {"msg": ..., "type": ...}}. A request runs on the
server's model through the same scheduler as every other route; `genkey` names it, so that
/api/extra/abort can end it (its rows are freed at the next step) and /api/extra/generate/check
can read its text so far.

Fields a Kobold front end sends that LLMOS does not implement, and so ignores: rep_pen_range,
rep_pen_slope (the repetition penalty covers the whole text), dry_sequence_breakers,
dry_penalty_last_n, mirostat, mirostat_tau, mirostat_eta, dynatemp_range, dynatemp_exponent,
smoothing_factor, smoothing_curve, nsigma, trim_stop (stop sequences are always cut off),
render_special, bypass_eos, quiet, use_default_badwordsids, n, images, grammar_retain_state.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict

import regex

from fastapi import APIRouter, Request as HTTPRequest
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from llmos.server import protocol as P
from llmos.server.errors import APIError, native_errors
from llmos.server.state import state
from llmos.server.streaming import batches, finish, submit

KOBOLDCPP_VERSION = "1.80"  # the KoboldCpp release whose API these routes follow (front ends gate features on it)
KOBOLD_API_VERSION = "1.2.5"  # the KoboldAI United API version KoboldCpp reports
MAX_KEPT = 256  # generations whose text /api/extra/generate/check can still read


def kobold_error(status: int, message: str, kind: str) -> dict:
    kind = "bad_input" if status < 500 and status != 429 else ("service_unavailable" if status in (429, 503)
                                                                else "service_error")
    return {"detail": {"msg": message, "type": kind}}


router = APIRouter(tags=["KoboldCpp-compatible"], route_class=native_errors(kobold_error))


class KoboldGenerate(BaseModel):
    """POST /api/v1/generate and /api/extra/generate/stream: KoboldCpp's generation request."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    memory: str = Field("", description="Text put before the prompt (KoboldCpp's memory).")
    max_length: int = Field(180, ge=1, description="Tokens to generate.")
    max_context_length: int | None = Field(None, ge=1, description="Context to fit the prompt in (cut from the "
                                                                     "left, after memory).")
    temperature: float | None = Field(None, ge=0)
    top_k: int | None = Field(None, ge=0, le=2**31 - 1)
    top_a: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0, le=1)
    min_p: float | None = Field(None, ge=0, le=1)
    typical: float | None = Field(None, ge=0, le=1)
    tfs: float | None = Field(None, ge=0, le=1)
    rep_pen: float | None = Field(None, gt=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    sampler_order: list[int] | None = Field(None, max_length=7, description="KoboldCpp's numbers: 0 top_k, 1 top_a, "
                                                                              "2 top_p, 3 tfs, 4 typical, 5 "
                                                                              "temperature, 6 rep_pen.")
    sampler_seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1, description="-1: random.")
    stop_sequence: list[str] | None = Field(None, max_length=256)
    banned_tokens: list[str] | None = Field(None, max_length=768, description="Strings never to produce.")
    banned_strings: list[str] | None = Field(None, max_length=768, description="SillyTavern's name for banned_tokens.")
    logit_bias: dict[str, float] | list = Field({}, description="Token id -> bias (-100 to 100).")
    custom_token_bans: str = Field("", description="Token ids never to produce, comma-separated.")
    dry_multiplier: float | None = Field(None, ge=0)
    dry_base: float | None = Field(None, ge=1)
    dry_allowed_length: int | None = Field(None, ge=1, le=2**31 - 1)
    xtc_threshold: float | None = Field(None, ge=0, le=1)
    xtc_probability: float | None = Field(None, ge=0, le=1)
    ban_eos_token: bool = False
    grammar: str = Field("", description="GBNF grammars are not supported: leave empty.")
    genkey: str | None = Field(None, max_length=200, description="A key naming this generation, for abort and check.")


class GenKey(BaseModel):
    model_config = ConfigDict(extra="ignore")

    genkey: str | None = Field(None, max_length=200)


class TokenCountBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    special: bool = Field(True, description="Count the beginning-of-text token, when the model's prompts start "
                                            "with one.")


class KoboldText(BaseModel):
    text: str
    finish_reason: str | None = None


class KoboldResults(BaseModel):
    results: list[KoboldText]


class KoboldResult(BaseModel):
    result: str


class KoboldValue(BaseModel):
    value: int


class KoboldVersion(BaseModel):
    result: str
    version: str
    txt2img: bool = False
    vision: bool = False
    transcribe: bool = False


class KoboldTokenCount(BaseModel):
    value: int
    ids: list[int]


class KoboldAbort(BaseModel):
    success: str
    done: str


class KoboldToken(BaseModel):
    token: str
    finish_reason: str | None


def kobold_params(llm, body: KoboldGenerate):
    """The request's SamplingParams (400 for an unknown sampler or a value out of range)."""
    vocab = llm.model.config.vocab_size
    order = None
    if body.sampler_order:
        unknown = [n for n in body.sampler_order if not 0 <= n < len(P.KOBOLD_SAMPLERS)]
        if unknown:
            raise APIError(400, f"sampler_order: unknown sampler {unknown[0]}; KoboldCpp's samplers are 0 top_k, "
                                f"1 top_a, 2 top_p, 3 tfs, 4 typical, 5 temperature, 6 rep_pen", "sampler_order")
        order = [P.KOBOLD_SAMPLERS[n] for n in dict.fromkeys(body.sampler_order)]
    bias = {}
    for key, value in (body.logit_bias.items() if isinstance(body.logit_bias, dict) else ()):
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab:
            raise APIError(400, f"logit_bias: {key!r} is not a token id of this model (0 to {vocab - 1})", "logit_bias")
        if not -100 <= value <= 100:
            raise APIError(400, f"logit_bias: {value} for token {key} is outside -100 to 100", "logit_bias")
        bias[int(key)] = value
    banned = [[int(t)] for t in (t.strip() for t in body.custom_token_bans.split(",")) if t.isdigit()]
    if any(b[0] >= vocab for b in banned):
        raise APIError(400, f"custom_token_bans: token ids must be below {vocab}", "custom_token_bans")
    values = {
        "max_tokens": body.max_length, "temperature": body.temperature, "top_k": body.top_k, "top_a": body.top_a,
        "top_p": body.top_p or None, "min_p": body.min_p, "typical_p": body.typical or None, "tfs": body.tfs,
        "repetition_penalty": body.rep_pen, "presence_penalty": body.presence_penalty,
        "dry_multiplier": body.dry_multiplier, "dry_base": body.dry_base, "dry_allowed_length": body.dry_allowed_length,
        "xtc_threshold": body.xtc_threshold, "xtc_probability": body.xtc_probability, "sampler_order": order,
        "seed": body.sampler_seed if body.sampler_seed is not None and body.sampler_seed >= 0 else None,
        "logit_bias": bias or None, "banned_sequences": banned or None,
    }
    names = {"max_tokens": "max_length", "typical_p": "typical", "repetition_penalty": "rep_pen", "seed": "sampler_seed"}
    try:
        return P.native_sampling(llm, values, names)
    except ValueError as e:
        raise APIError(400, str(e)) from None


def _jobs(http: HTTPRequest) -> OrderedDict:
    """genkey -> the latest engine request started under it ("" for those without one)."""
    app_state = http.app.state
    if not hasattr(app_state, "kobold_jobs"):
        app_state.kobold_jobs = OrderedDict()
    return app_state.kobold_jobs


async def _start(body: KoboldGenerate, http: HTTPRequest):
    if body.grammar:
        raise APIError(400, "grammar (GBNF) is not supported here: leave it empty", "grammar")
    st = state(http)
    served = await st.local(http, None, body.prompt)
    llm = served.llm
    st.check_max_tokens(body.max_length, "max_length")
    params = kobold_params(llm, body)
    stops = [s for s in body.stop_sequence or [] if s]
    # KoboldCpp bans a string wherever it appears, in any case: as a pattern, not a whole word
    banned = [regex.escape(s) for s in body.banned_tokens or body.banned_strings or [] if s]
    try:
        req = await asyncio.to_thread(llm.request, body.memory + body.prompt, params, 1, stops,
                                      ignore_eos=body.ban_eos_token, empty_ok=True, banned_strings=banned or None,
                                      banned_regex=True)
    except ValueError as e:
        raise APIError(400, str(e), "prompt") from None
    P.fit_prompt(req, min(body.max_context_length or served.scheduler.max_len, served.scheduler.max_len))
    await submit(served, req, st.request_timeout)
    jobs = _jobs(http)
    key = body.genkey or ""
    jobs.pop(key, None)
    jobs[key] = req
    while len(jobs) > MAX_KEPT:
        jobs.popitem(last=False)
    return st, llm, req


def _reason(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


@router.post("/api/v1/generate", response_model=KoboldResults)
async def generate(body: KoboldGenerate, http: HTTPRequest):
    st, llm, req = await _start(body, http)
    reasons = await finish(req, http)
    st.ended(req, llm)
    return {"results": [{"text": req.hook.texts[0], "finish_reason": _reason(reasons.get(0))}]}


@router.post("/api/extra/generate/stream", response_model=KoboldToken,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": 'Server-sent events "message", each {"token", "finish_reason"}.'}})
async def generate_stream(body: KoboldGenerate, http: HTTPRequest):
    st, llm, req = await _start(body, http)

    def event(token: str, reason: str | None) -> str:
        return f"event: message\ndata: {json.dumps({'token': token, 'finish_reason': reason}, ensure_ascii=False)}\n\n"

    async def events():
        try:
            async for batch in batches(req, http):
                text = "".join(e.text for e in batch)
                ended = next((e.finish_reason for e in batch if e.finish_reason), None)
                if text or ended:
                    yield event(text, _reason(ended) if ended else None)
        except APIError as e:
            yield f"event: error\ndata: {json.dumps(kobold_error(e.status, e.message, e.kind))}\n\n"
        finally:
            st.ended(req, llm)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.post("/api/extra/abort", response_model=KoboldAbort)
def abort(http: HTTPRequest, body: GenKey | None = None):
    """End the generation started with this genkey (without one: those started without a key)."""
    req = _jobs(http).get((body.genkey if body else None) or "")
    if req is None or req.done:
        return {"success": "false", "done": "true"}
    req.cancel()
    return {"success": "true", "done": "true"}


@router.post("/api/extra/generate/check", response_model=KoboldResults)
def check(http: HTTPRequest, body: GenKey | None = None):
    """The text so far of the generation with this genkey (polled streaming)."""
    req = _jobs(http).get((body.genkey if body else None) or "")
    return {"results": [{"text": req.hook.texts[0] if req is not None and req.hook else ""}]}


@router.get("/api/extra/generate/check", response_model=KoboldResults)
def check_latest(http: HTTPRequest):
    """The text so far of the latest generation started without a genkey."""
    return check(http)


@router.post("/api/extra/tokencount", response_model=KoboldTokenCount)
async def tokencount(body: TokenCountBody, http: HTTPRequest):
    llm = state(http).primary.llm
    ids = await asyncio.to_thread(llm.tokenizer.encode, body.prompt, None if body.special else False)
    return {"value": len(ids), "ids": ids}


@router.get("/api/v1/model", response_model=KoboldResult)
def model(http: HTTPRequest):
    return {"result": state(http).primary.name}


@router.get("/api/v1/info/version", response_model=KoboldResult)
def api_version():
    return {"result": KOBOLD_API_VERSION}


@router.get("/api/extra/version", response_model=KoboldVersion)
def extra_version():
    """'KoboldCpp' here is what tells a front end it may stream (/api/extra/generate/stream)."""
    return {"result": "KoboldCpp", "version": KOBOLDCPP_VERSION}


@router.get("/api/v1/config/max_context_length", response_model=KoboldValue)
@router.get("/api/extra/true_max_context_length", response_model=KoboldValue)
def max_context_length(http: HTTPRequest):
    return {"value": state(http).primary.scheduler.max_len}


@router.get("/api/v1/config/max_length", response_model=KoboldValue)
def max_length(http: HTTPRequest):
    st = state(http)
    return {"value": min(st.primary.llm.defaults.get("max_tokens", 256), st.limits.max_tokens)}
