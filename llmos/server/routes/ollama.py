"""Ollama's API: /api/generate and /api/chat (newline-delimited JSON when streamed, the default),
/api/tags, /api/show and /api/version. What SillyTavern's Ollama connection, the official
`ollama` clients and the many tools written for Ollama call.

Errors come in Ollama's shape, {"error": "..."}. Each streamed object is written as its own HTTP
chunk: SillyTavern's parser loses text when several arrive in one.

Fields an Ollama client sends that LLMOS does not implement, and so ignores: keep_alive,
template, context (the token ids of an earlier answer), think, logprobs, top_logprobs, and
the options repeat_last_n, mirostat, mirostat_tau, mirostat_eta, penalize_newline, numa, num_batch, num_gpu, main_gpu,
low_vram, f16_kv, logits_all, vocab_only, use_mmap, use_mlock, embedding_only, num_thread.
An option Ollama does not have is a 400 naming it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from datetime import datetime, timezone
from typing import Any, Literal

from fastapi import APIRouter, Request as HTTPRequest
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from llmos.server import protocol as P
from llmos.server.errors import APIError, native_errors, not_found
from llmos.server.state import state
from llmos.server.streaming import batches, finish, submit

OLLAMA_VERSION = "0.9.0"  # the Ollama release whose API these routes follow

IMPLEMENTED = {"num_predict": "max_tokens", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
               "min_p": "min_p", "typical_p": "typical_p", "repeat_penalty": "repetition_penalty",
               "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty", "seed": "seed",
               "tfs_z": "tfs"}
CONTEXT = ("num_ctx", "num_keep", "stop")  # options read by the route itself
IGNORED = ("repeat_last_n", "mirostat", "mirostat_tau", "mirostat_eta", "penalize_newline", "numa", "num_batch",
           "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mmap", "use_mlock",
           "embedding_only", "num_thread")


def ollama_error(status: int, message: str, kind: str) -> dict:
    return {"error": message}


router = APIRouter(tags=["Ollama-compatible"], route_class=native_errors(ollama_error))


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None


class OllamaBase(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field("", description="A model of GET /api/tags (':latest' may be added).")
    stream: bool = True
    format: Literal["", "json"] | dict[str, Any] | None = Field(None, description='"json", or a JSON schema the '
                                                                                 'answer must follow.')
    options: dict[str, Any] = {}


class OllamaGenerate(OllamaBase):
    """POST /api/generate."""

    prompt: str = ""
    system: str | None = None
    raw: bool = Field(False, description="Send the prompt as it is, without the model's chat template.")
    suffix: str | None = None
    images: list[str] | None = None


class OllamaChat(OllamaBase):
    """POST /api/chat."""

    messages: list[OllamaMessage] = []
    tools: list[dict[str, Any]] | None = None


class ShowBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = ""
    name: str = Field("", description="The model's older name field.")


class OllamaAnswer(BaseModel):
    """One object of a streamed answer, or the whole answer (done: true)."""

    model: str
    created_at: str
    response: str | None = None
    message: dict[str, str] | None = None
    done: bool
    done_reason: str | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None
    context: list[int] | None = None


class ModelDetails(BaseModel):
    parent_model: str
    format: str
    family: str
    families: list[str]
    parameter_size: str
    quantization_level: str


class TagModel(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails


class Tags(BaseModel):
    models: list[TagModel]


class ShowResponse(BaseModel):
    modelfile: str
    parameters: str
    template: str
    details: ModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]


class Version(BaseModel):
    version: str


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _served(st, name: str):
    if not name:
        raise APIError(400, "model is required: name one of GET /api/tags", "model")
    bare = name.removesuffix(":latest")
    for served in st.served.values():
        if bare == served.name:
            return served
    raise not_found(f"model {name!r} not found; GET /api/tags lists the models served here", "model")


def ollama_params(st, served, body: OllamaBase):
    """SamplingParams, the context to fit the prompt in and the tokens kept at its start, and the
    stop strings of a request's options (400 for an unknown option or a value out of range)."""
    opts = dict(body.options or {})
    unknown = [k for k in opts if k not in IMPLEMENTED and k not in CONTEXT and k not in IGNORED]
    if unknown:
        raise APIError(400, f"unknown option {unknown[0]!r}; Ollama's options are {', '.join(sorted(IMPLEMENTED))}, "
                            f"num_ctx, num_keep, stop and others this server ignores", "options")
    values = {IMPLEMENTED[k]: v for k, v in opts.items() if k in IMPLEMENTED}
    for key, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise APIError(400, f"option {key} must be a number, got {value!r}", "options")
    limit = served.scheduler.max_len
    num_ctx, keep = opts.get("num_ctx"), opts.get("num_keep") or 0
    for name, value in (("num_ctx", num_ctx), ("num_keep", keep)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise APIError(400, f"option {name} must be a whole number >= 0, got {value!r}", "options")
    limit = min(num_ctx or limit, limit)
    predict = values.get("max_tokens")
    if predict is not None:
        if not isinstance(predict, int) or predict == 0 or predict < -2:
            raise APIError(400, f"option num_predict must be a positive whole number, or -1 (until the end) or -2 "
                                f"(fill the context), got {predict!r}", "options")
        if predict < 0:
            values["max_tokens"] = min(st.limits.max_tokens, limit)
        st.check_max_tokens(values["max_tokens"], "num_predict")
    if values.get("seed") is not None and values["seed"] < 0:
        values["seed"] = None  # Ollama: a negative seed is a random one
    stop = opts.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise APIError(400, "option stop must be a list of strings", "options")
    names = {v: k for k, v in IMPLEMENTED.items()}
    try:
        params = P.native_sampling(served.llm, values, names)
    except (ValueError, TypeError) as e:
        raise APIError(400, f"option {e}", "options") from None
    return _with_format(served.llm, params, body.format), limit, keep, [s for s in stop if s]


def _with_format(llm, params, fmt):
    """format: "json" or a JSON schema, kept by constrained decoding."""
    if not fmt:
        return params
    try:
        from llmos.writing.json_schema import json_constraint
    except ImportError:
        raise APIError(400, "format is not supported yet by this server: leave it out", "format") from None
    from dataclasses import replace

    try:
        return replace(params, constraint=json_constraint(llm, None if fmt == "json" else fmt))
    except ValueError as e:
        raise APIError(400, f"format: {e}", "format") from None


async def _run(st, served, prompt, body: OllamaBase, http: HTTPRequest, chat: bool, shape):
    """Generate and answer: one object, or NDJSON objects (each its own chunk) ending in done: true.
    shape(text) -> the fields of an answer carrying text (response, or message)."""
    llm = served.llm
    params, limit, keep, stops = ollama_params(st, served, body)
    started = time.monotonic()
    try:
        req = await asyncio.to_thread(llm.request, prompt, params, 1, stops, chat=chat)
    except ValueError as e:
        raise APIError(400, str(e), "prompt") from None
    P.fit_prompt(req, limit, keep)
    await submit(served, req, st.request_timeout)

    def last(reason):
        t = req.timings
        generated = sum(len(s.output) for s in req.sequences)
        return {"done": True, "done_reason": "length" if reason == "length" else "stop",
                "total_duration": int((time.monotonic() - started) * 1e9), "load_duration": 0,
                "prompt_eval_count": len(req.prompt), "prompt_eval_duration": int(t.prefill_s * 1e9),
                "eval_count": generated, "eval_duration": int(t.decode_s * 1e9),
                **({} if chat else {"context": list(req.prompt) + (req.sequences[0].output if req.sequences else [])})}

    if not body.stream:
        reasons = await finish(req, http)
        st.ended(req, llm)
        return {"model": served.name, "created_at": _now(), **shape(req.hook.texts[0]), **last(reasons.get(0))}

    async def lines():
        try:
            async for batch in batches(req, http):
                text = "".join(e.text for e in batch)
                ended = next((e.finish_reason for e in batch if e.finish_reason), None)
                if text or ended:  # the last text rides on the done object: one write, never two at once
                    yield json.dumps({"model": served.name, "created_at": _now(), **shape(text),
                                      **(last(ended) if ended else {"done": False})}, ensure_ascii=False) + "\n"
        except APIError as e:
            yield json.dumps({"error": e.message}) + "\n"
        finally:
            st.ended(req, llm)

    return StreamingResponse(lines(), media_type="application/x-ndjson")


NDJSON = {200: {"content": {"application/x-ndjson": {}},
                "description": "One JSON object, or (stream: true, the default) one per line, the last with done: true."}}


@router.post("/api/generate", response_model=OllamaAnswer, response_model_exclude_none=True, responses=NDJSON)
async def generate(body: OllamaGenerate, http: HTTPRequest):
    st = state(http)
    served = _served(st, body.model)
    if body.images:
        raise APIError(400, f"{served.name} reads text only: send no images", "images")
    if body.suffix:
        raise APIError(400, "suffix (fill in the middle) is not supported: leave it out", "suffix")
    if not body.prompt:  # Ollama: an empty prompt only loads the model
        return {"model": served.name, "created_at": _now(), "response": "", "done": True, "done_reason": "load"}
    if body.raw:
        prompt, chat = body.prompt, False
    else:
        prompt = ([{"role": "system", "content": body.system}] if body.system else []) + \
                 [{"role": "user", "content": body.prompt}]
        chat = True
    return await _run(st, served, prompt, body, http, chat, lambda text: {"response": text})


@router.post("/api/chat", response_model=OllamaAnswer, response_model_exclude_none=True, responses=NDJSON)
async def chat(body: OllamaChat, http: HTTPRequest):
    st = state(http)
    served = _served(st, body.model)
    if body.tools:
        raise APIError(400, "tools are not supported by this server: leave them out", "tools")
    if any(m.images for m in body.messages):
        raise APIError(400, f"{served.name} reads text only: send messages without images", "messages")
    if not body.messages:  # Ollama: no messages only loads the model
        return {"model": served.name, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                "done": True, "done_reason": "load"}
    messages = [{"role": m.role, "content": m.content} for m in body.messages]
    return await _run(st, served, messages, body, http, True,
                      lambda text: {"message": {"role": "assistant", "content": text}})


def _details(llm) -> dict:
    params = sum(p.numel() for p in llm.model.parameters())
    size = f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.0f}M" if params >= 1e6 else f"{params / 1e3:.0f}K"
    arch = llm.model.config.arch
    return {"parent_model": "", "format": "safetensors", "family": arch, "families": [arch],
            "parameter_size": size, "quantization_level": llm.loaded.precision.upper()}


@router.get("/api/tags", response_model=Tags)
def tags(http: HTTPRequest):
    """The models served here (SillyTavern picks one from this list)."""
    models = []
    for name, served in {s.name: s for s in state(http).served.values()}.items():
        path = served.llm.loaded.path
        files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
        models.append({"name": name, "model": name,
                       "modified_at": datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(),
                       "size": sum(f.stat().st_size for f in files),
                       "digest": hashlib.sha256(f"{name}:{path}".encode()).hexdigest(),
                       "details": _details(served.llm)})
    return {"models": models}


@router.post("/api/show", response_model=ShowResponse)
def show(body: ShowBody, http: HTTPRequest):
    served = _served(state(http), body.model or body.name)
    llm = served.llm
    cfg = llm.model.config
    defaults = llm.defaults
    return {"modelfile": f"# served by LLMOS\nFROM {served.name}\n",
            "parameters": "\n".join(f"{k} {v}" for k, v in defaults.items() if isinstance(v, (int, float, str))),
            "template": llm.tokenizer.chat_template or "", "details": _details(llm),
            "model_info": {"general.architecture": cfg.arch, f"{cfg.arch}.context_length": cfg.max_seq_len,
                           f"{cfg.arch}.embedding_length": cfg.d_model, f"{cfg.arch}.block_count": cfg.n_layer,
                           "general.parameter_count": sum(p.numel() for p in llm.model.parameters())},
            "capabilities": ["completion"]}


@router.get("/api/version", response_model=Version)
def version():
    return {"version": OLLAMA_VERSION}
