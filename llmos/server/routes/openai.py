"""The OpenAI-compatible routes: models, completions, chat completions, embeddings."""

from __future__ import annotations

import asyncio
import base64
import struct

from fastapi import APIRouter, Request as HTTPRequest

from llmos.server import protocol as P
from llmos.server.errors import APIError, param_of
from llmos.server.proxy import proxy
from llmos.server.state import state
from llmos.server.scheduler import QueueFull
from llmos.server.streaming import BUSY, event_stream, finish, sse, submit, watch_disconnect

router = APIRouter(tags=["OpenAI-compatible"])

SSE = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or server-sent events with `stream: true`."}}
ERRORS = {400: {"model": P.ErrorResponse}, 404: {"model": P.ErrorResponse}, 429: {"model": P.ErrorResponse}}


def sampling(st, llm, body: P.SamplingFields, logprobs: int | None):
    st.check_max_tokens(body.max_tokens)
    try:
        return body.sampling(llm, logprobs, llm.model.config.vocab_size)
    except ValueError as e:
        raise APIError(400, str(e), param_of(str(e))) from None


async def engine_request(llm, prompt, params, body: P.SamplingFields):
    """The engine request of a prompt or chat; tokenized in a worker thread, since a long
    prompt takes a while and the event loop is feeding every other stream meanwhile."""
    try:
        return await asyncio.to_thread(llm.request, prompt, params, body.n, body.stops(), ignore_eos=body.ignore_eos,
                                       banned_strings=body.banned(), banned_regex=body.banned_regex)
    except ValueError as e:  # an empty prompt, a chat template that rejects the messages
        raise APIError(400, str(e), "messages" if isinstance(prompt, list) else "prompt") from None


def _stream(st, llm, req, http: HTTPRequest, body: P.SamplingFields, chunk, head: list[str], envelope):
    """The SSE response of a completion or chat completion, with the usage chunk when asked."""

    def tail():
        if body.stream_options and body.stream_options.include_usage:
            yield sse(envelope([], usage=P.usage(req)))

    return event_stream(req, http, chunk, head=head, tail=tail, on_end=lambda: st.ended(req, llm))


@router.get("/v1/models", response_model=P.ModelList)
def list_models(http: HTTPRequest):
    st = state(http)
    data = [{"id": name, "object": "model", "created": P.now(), "owned_by": "llmos"}
            for name in dict.fromkeys(s.name for s in st.served.values())]
    data += [{"id": name, "object": "model", "created": P.now(), "owned_by": f"remote:{r.kind}"}
             for name, r in st.remotes.items()]
    return {"object": "list", "data": data}


@router.post("/v1/completions", response_model=P.CompletionResponse, responses={**SSE, **ERRORS})
async def completions(body: P.CompletionRequest, http: HTTPRequest):
    st = state(http)
    if remote := st.remote(body.model):
        return await proxy(remote, "completions", body.model_dump(exclude_none=True), body.stream)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise APIError(400, "send one prompt per request (a list of several is not supported)", "prompt")
    prompt = prompts[0]
    served = await st.local(http, body.model, prompt)
    llm = served.llm
    if not prompt:
        raise APIError(400, "the prompt is empty", "prompt")
    if body.beams:
        return await _beam_search(served, body, http)
    params = sampling(st, llm, body, body.logprobs)
    req = await engine_request(llm, prompt, params, body)
    await submit(served, req, st.request_timeout)
    rid, created, name = P.new_id("cmpl"), P.now(), served.name
    prefix = prompt if body.echo else ""

    def envelope(choices, **extra):
        return {"id": rid, "object": "text_completion", "created": created, "model": name, "choices": choices, **extra}

    if body.stream:
        head = [sse(envelope([{"index": i, "text": prefix, "logprobs": None, "finish_reason": None}
                              for i in range(body.n)]))] if prefix else []

        def chunk(e):
            if e.finish_reason is None and not e.text and e.logprob is None:
                return None
            lp = P.completion_logprobs(llm.tokenizer, [e.logprob]) if e.logprob is not None and e.finish_reason is None else None
            return sse(envelope([{"index": e.index, "text": e.text, "logprobs": lp,
                                  "finish_reason": e.finish_reason and P.finish_reason(e.finish_reason)}]))

        return _stream(st, llm, req, http, body, chunk, head, envelope)
    reasons = await finish(req, http)
    st.ended(req, llm)
    choices = []
    for i, seq in enumerate(req.sequences):
        lp = P.completion_logprobs(llm.tokenizer, seq.logprobs) if body.logprobs is not None else None
        choices.append({"index": i, "text": prefix + req.hook.texts[i], "logprobs": lp,
                        "finish_reason": P.finish_reason(reasons.get(i))})
    return envelope(choices, usage=P.usage(req))


async def _beam_search(served, body: P.CompletionRequest, http: HTTPRequest):
    """Beam search is its own algorithm (not batched with other requests): run in a thread."""
    if body.stream:
        raise APIError(400, "beam search returns whole texts: send stream: false", "stream")
    if body.n > body.beams:
        raise APIError(400, f"n must be at most beams ({body.beams})", "n")
    llm = served.llm
    state(http).check_max_tokens(body.max_tokens)
    max_tokens = body.max_tokens or llm.defaults.get("max_tokens", 256)
    try:
        result = await asyncio.to_thread(llm.beam_search, body.prompt if isinstance(body.prompt, str) else body.prompt[0],
                                         body.beams, max_tokens, body.n, body.length_penalty)
    except ValueError as e:
        raise APIError(400, str(e), "prompt") from None
    generated = sum(len(c.token_ids) for c in result.completions)
    return {"id": P.new_id("cmpl"), "object": "text_completion", "created": P.now(), "model": served.name,
            "choices": [{"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                        for c in result.completions],
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": generated,
                      "total_tokens": result.prompt_tokens + generated}}


@router.post("/v1/chat/completions", response_model=P.ChatCompletionResponse, responses={**SSE, **ERRORS})
async def chat_completions(body: P.ChatCompletionRequest, http: HTTPRequest):
    st = state(http)
    if remote := st.remote(body.model):
        return await proxy(remote, "chat/completions", body.model_dump(exclude_none=True), body.stream)
    if body.max_completion_tokens and not body.max_tokens:
        body.max_tokens = body.max_completion_tokens
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    served = await st.local(http, body.model, *(m["content"] for m in messages))
    llm = served.llm
    params = sampling(st, llm, body, (body.top_logprobs or 0) if body.logprobs else None)
    req = await engine_request(llm, messages, params, body)
    await submit(served, req, st.request_timeout)
    rid, created, name = P.new_id("chatcmpl"), P.now(), served.name

    def envelope(choices, **extra):
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name, "choices": choices, **extra}

    if body.stream:
        head = [sse(envelope([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None}])) for i in range(body.n)]

        def chunk(e):
            if e.finish_reason is not None:
                return sse(envelope([{"index": e.index, "delta": {}, "logprobs": None,
                                      "finish_reason": P.finish_reason(e.finish_reason)}]))
            if not e.text and e.logprob is None:
                return None
            lp = {"content": P.chat_logprobs(llm.tokenizer, [e.logprob])} if body.logprobs and e.logprob else None
            return sse(envelope([{"index": e.index, "delta": {"content": e.text}, "logprobs": lp, "finish_reason": None}]))

        return _stream(st, llm, req, http, body, chunk, head, envelope)
    reasons = await finish(req, http)
    st.ended(req, llm)
    choices = []
    for i, seq in enumerate(req.sequences):
        lp = {"content": P.chat_logprobs(llm.tokenizer, seq.logprobs)} if body.logprobs else None
        choices.append({"index": i, "message": {"role": "assistant", "content": req.hook.texts[i]},
                        "logprobs": lp, "finish_reason": P.finish_reason(reasons.get(i))})
    return {"id": rid, "object": "chat.completion", "created": created, "model": name, "choices": choices,
            "usage": P.usage(req)}


@router.post("/v1/moderations", response_model=P.ModerationResponse, responses=ERRORS)
async def moderations(body: P.ModerationRequest, http: HTTPRequest):
    """Texts checked against the server's safety policy (`llmos serve --safety`), in OpenAI's
    shape; each result also says the action the policy takes and what fired (without the text)."""
    from llmos.embedder import EmbedderError
    from llmos.safety import moderate
    from llmos.weights.store import ModelError

    st = state(http)
    texts = body.texts()
    if not texts or len(texts) > st.limits.max_embedding_inputs:
        raise APIError(400, f"input must hold 1 to {st.limits.max_embedding_inputs} texts", "input")
    try:
        results = await asyncio.to_thread(moderate, texts, st.moderation_policy)
    except (EmbedderError, ModelError) as e:  # the policy's classifier needs the embedder, and it is not here
        raise APIError(503, f"the safety classifier needs its embedding model, which cannot be loaded here ({e}); "
                            f"pull it once with network access, or serve with a policy whose classifier is off",
                       kind="server_error") from None
    return {"id": P.new_id("modr"), "model": body.model or "llmos-safety", "results": results}


EMBED_PIECE_TOKENS = 4096  # padded positions per piece run between decode steps


@router.post("/v1/embeddings", response_model=P.EmbeddingResponse, responses=ERRORS)
async def embeddings(body: P.EmbeddingRequest, http: HTTPRequest):
    """Embeddings, bounded (inputs, tokens per input and per request) and queued on the model's
    scheduler in small pieces between decode steps (429 when its queue is full)."""
    st = state(http)
    if remote := st.remote(body.model):
        return await proxy(remote, "embeddings", body.model_dump(exclude_none=True), False)
    texts = [body.input] if isinstance(body.input, str) else body.input
    limits = st.limits
    if not texts or any(not t for t in texts):
        raise APIError(400, "input must be a non-empty string or list of non-empty strings", "input")
    if len(texts) > limits.max_embedding_inputs:
        raise APIError(400, f"input has {len(texts)} texts; send at most {limits.max_embedding_inputs} per request",
                       "input")
    served = await st.local(http, body.model, *texts)
    llm = served.llm
    ids = await asyncio.to_thread(lambda: [llm.tokenizer.encode(t, add_bos=False) or [0] for t in texts])
    window = llm.context_window
    for i, t in enumerate(ids):
        if len(t) > window:
            raise APIError(400, f"input[{i}] is {len(t)} tokens; the model embeds at most {window}", "input")
    tokens = sum(len(t) for t in ids)
    if tokens > limits.max_embedding_tokens:
        raise APIError(400, f"input is {tokens} tokens in all; send at most {limits.max_embedding_tokens} per request",
                       "input")
    pieces, piece, width = [], [], 0
    for t in sorted(range(len(ids)), key=lambda i: len(ids[i])):  # similar lengths together: less padding
        width = max(width, len(ids[t]))
        if piece and width * (len(piece) + 1) > EMBED_PIECE_TOKENS:
            pieces.append(piece)
            piece, width = [], len(ids[t])
        piece.append(t)
    pieces.append(piece)
    try:
        future = served.scheduler.run([lambda p=p: llm.embed_tokens([ids[i] for i in p]) for p in pieces])
    except QueueFull:
        raise APIError(429, BUSY, kind="rate_limit_error", headers={"Retry-After": "1"}) from None
    watcher = asyncio.create_task(watch_disconnect(http, future.cancel))  # gone: the pieces not yet run are dropped
    try:
        done = await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        if not future.cancelled():
            raise
        raise APIError(499, "the client went away") from None
    finally:
        watcher.cancel()
    vectors: list = [None] * len(texts)
    for p, out in zip(pieces, done):
        for i, v in zip(p, out.tolist()):
            vectors[i] = v
    return {"object": "list", "model": served.name,
            "data": [{"object": "embedding", "index": i,
                      "embedding": _base64(v) if body.encoding_format == "base64" else v}
                     for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()

