"""`llmos serve`: the OpenAI-compatible API, LLMOS's own endpoints and the studio page.

Routes are thin: a request becomes a scheduler Request (or, for a remote model, a call to its
server), and events become JSON or server-sent events.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from pathlib import Path

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmos.server import protocol as P
from llmos.server.metrics import Metrics
from llmos.server.scheduler import QueueFull, Request, Scheduler

STATIC = Path(__file__).parent / "static"


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


class Gate:
    """ASGI middleware in front of every route: the API key (401) and the body size limit (413,
    declared or not). Plain ASGI rather than an `@app.middleware` function, which would copy every
    streamed chunk through an extra task and queue."""

    def __init__(self, app, limit: int, api_key: str | None = None, on_reject=None):
        self.app, self.limit, self.api_key, self.on_reject = app, limit, api_key, on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        path = scope.get("path", "")

        async def reject(status: int, message: str, kind: str = "invalid_request_error"):
            if self.on_reject:
                self.on_reject(path, status)
            await _send_error(send, status, message, kind)

        if self.api_key and (path.startswith("/v1/") or path.startswith("/api/")):
            if headers.get(b"authorization", b"") != f"Bearer {self.api_key}".encode():
                return await reject(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                    "authentication_error")
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await reject(413, f"request body over {self.limit} bytes")
        parts, seen = [], 0  # read the (small, JSON) body here so an over-long one is a clean 413
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            seen += len(message.get("body", b""))
            if seen > self.limit:
                return await reject(413, f"request body over {self.limit} bytes")
            parts.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(parts), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _send_error(send, status: int, message: str, kind: str = "invalid_request_error"):
    body = json.dumps(P.error_body(message, kind=kind)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(llm, *, api_key: str | None = None, max_batch: int = 16, max_len: int = 2048, max_queue: int = 64,
               request_timeout: float = 300.0, max_body: int = 1_000_000, remotes: dict | None = None,
               store=None) -> FastAPI:
    from contextlib import asynccontextmanager

    scheduler = Scheduler(llm, max_batch=max_batch, max_len=max_len, max_queue=max_queue)

    @asynccontextmanager
    async def lifespan(app):
        yield
        scheduler.close()

    app = FastAPI(title="LLMOS", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API, writing tasks and the writing studio of LLMOS.")
    metrics = Metrics(scheduler)
    remotes = remotes or {}
    app.state.scheduler, app.state.llm, app.state.metrics = scheduler, llm, metrics
    if store is None:
        from llmos.db import Store

        store = Store()
    app.state.store = store
    app.add_middleware(Gate, limit=max_body, api_key=api_key, on_reject=metrics.count_request)

    # -- errors: always an OpenAI error object, never a bare 500 for bad input --

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        metrics.count_request(request.url.path, exc.status)
        return JSONResponse(P.error_body(exc.message, exc.param, exc.kind), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        first = exc.errors()[0]
        loc = [str(x) for x in first.get("loc", []) if x != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        metrics.count_request(request.url.path, 400)
        return JSONResponse(P.error_body(f"{param}: {msg}" if param else msg, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc):
        metrics.count_request(request.url.path, exc.status_code)
        return JSONResponse(P.error_body(str(exc.detail)), status_code=exc.status_code)

    # -- helpers --

    def local_name() -> str:
        return llm.name

    def pick(model: str | None):
        """(local LLM or None, remote client or None) for a request's `model` field."""
        if model in (None, "", local_name()):
            return llm, None
        if model in remotes:
            return None, remotes[model]
        raise APIError(404, f"model {model!r} is not served here; GET /v1/models lists the models", "model",
                       "not_found_error")

    async def submit(ids: list[int], params, n: int, stops: list[str]) -> Request:
        loop = asyncio.get_running_loop()
        req = Request(ids, params, n=n, stop=stops, deadline=time.monotonic() + request_timeout,
                      loop=loop, events=asyncio.Queue())
        try:
            scheduler.submit(req)
        except QueueFull:
            raise APIError(429, "the server is busy: too many requests are waiting; retry shortly",
                           kind="rate_limit_error", headers={"Retry-After": "1"}) from None
        except ValueError as e:
            raise APIError(400, str(e), "prompt") from None
        return req

    async def batches_of(req: Request, http: HTTPRequest):
        """Scheduler events until every candidate has finished, in lists of those already
        waiting (a stream behind by several tokens sends them in one write); a client that
        disconnects cancels its sequences."""
        done = 0
        try:
            while done < req.n:
                try:
                    batch = [await asyncio.wait_for(req.events.get(), timeout=0.5)] if req.events.empty() else []
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        req.cancelled = True
                        return
                    continue
                while not req.events.empty():
                    batch.append(req.events.get_nowait())
                for event in batch:
                    if event.finish_reason == "error":
                        raise APIError(500, f"generation failed: {event.text}", kind="server_error")
                    done += event.finish_reason is not None
                yield batch
        finally:
            if done < req.n:
                req.cancelled = True

    async def finish_reasons(req: Request, http: HTTPRequest) -> dict[int, str]:
        """Wait for a non-streamed request to end: each candidate's finish reason."""
        reasons = {}
        async for batch in batches_of(req, http):
            reasons.update((e.index, e.finish_reason) for e in batch if e.finish_reason)
        finalize(req, http.url.path)
        return reasons

    def finalize(req: Request, path: str, status: int = 200):
        metrics.observe(req, status)
        metrics.count_request(path, status)

    def sampling(body, logprobs):
        try:
            params = body.sampling(llm, logprobs, llm.model.config.vocab_size)
        except ValueError as e:
            raise APIError(400, str(e), _param_of(str(e))) from None
        return params if body.ignore_eos else with_eos(params)

    def with_eos(params):
        """The model's end-of-text tokens end every sequence (unless a request says ignore_eos)."""
        return replace(params, stop_token_ids=sorted(set(params.stop_token_ids) | set(llm.tokenizer.stop_ids)))

    # -- OpenAI API --

    @app.get("/v1/models")
    def models():
        data = [{"id": local_name(), "object": "model", "created": P.now(), "owned_by": "llmos"}]
        data += [{"id": name, "object": "model", "created": P.now(), "owned_by": f"remote:{r.kind}"} for name, r in remotes.items()]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, http: HTTPRequest):
        local, remote = pick(body.model)
        if remote is not None:
            return await remote.proxy("completions", body.model_dump(exclude_none=True), body.stream)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise APIError(400, "send one prompt per request (a list of several is not supported)", "prompt")
        prompt = prompts[0]
        ids = llm.tokenizer.encode(prompt)
        if not ids:
            raise APIError(400, "the prompt is empty", "prompt")
        params = sampling(body, body.logprobs)
        req = await submit(ids, params, body.n, body.stops())
        rid, created, name = P.new_id("cmpl"), P.now(), local_name()
        prefix = prompt if body.echo else ""
        if body.stream:
            async def sse():
                try:
                    if prefix:
                        yield _sse({"id": rid, "object": "text_completion", "created": created, "model": name,
                                    "choices": [{"index": i, "text": prefix, "logprobs": None, "finish_reason": None}
                                                for i in range(body.n)]})
                    def chunk(e):
                        lp = _completion_logprobs(llm, [e.logprob]) if e.logprob is not None and e.finish_reason is None else None
                        return _sse({"id": rid, "object": "text_completion", "created": created, "model": name,
                                     "choices": [{"index": e.index, "text": e.text, "logprobs": lp,
                                                  "finish_reason": e.finish_reason}]})

                    async for batch in batches_of(req, http):
                        yield "".join(map(chunk, batch))
                    if body.stream_options and body.stream_options.include_usage:
                        yield _sse({"id": rid, "object": "text_completion", "created": created, "model": name,
                                    "choices": [], "usage": _usage(req)})
                    yield "data: [DONE]\n\n"
                finally:
                    finalize(req, http.url.path)
            return StreamingResponse(sse(), media_type="text/event-stream")
        reasons = await finish_reasons(req, http)
        choices = []
        for i, seq in enumerate(req.sequences):
            lp = _completion_logprobs(llm, seq.logprobs) if body.logprobs is not None else None
            choices.append({"index": i, "text": prefix + req.texts[i], "logprobs": lp,
                            "finish_reason": _finish(reasons.get(i))})
        return {"id": rid, "object": "text_completion", "created": created, "model": name,
                "choices": choices, "usage": _usage(req)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: P.ChatCompletionRequest, http: HTTPRequest):
        local, remote = pick(body.model)
        if remote is not None:
            return await remote.proxy("chat/completions", body.model_dump(exclude_none=True), body.stream)
        if body.max_completion_tokens and not body.max_tokens:
            body.max_tokens = body.max_completion_tokens
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        try:
            ids = llm.tokenizer.encode_chat(messages)
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        k = (body.top_logprobs or 0) if body.logprobs else None
        params = sampling(body, k)
        req = await submit(ids, params, body.n, body.stops() + llm.tokenizer.chat_stop_strings())
        rid, created, name = P.new_id("chatcmpl"), P.now(), local_name()
        if body.stream:
            async def sse():
                try:
                    for i in range(body.n):
                        yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                                    "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]})
                    def chunk(e):
                        if e.finish_reason is not None:
                            choice = {"index": e.index, "delta": {}, "logprobs": None, "finish_reason": _finish(e.finish_reason)}
                        else:
                            lp = {"content": _chat_logprobs(llm, [e.logprob])} if body.logprobs and e.logprob else None
                            choice = {"index": e.index, "delta": {"content": e.text}, "logprobs": lp, "finish_reason": None}
                        return _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                                     "choices": [choice]})

                    async for batch in batches_of(req, http):
                        yield "".join(map(chunk, batch))
                    if body.stream_options and body.stream_options.include_usage:
                        yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                                    "choices": [], "usage": _usage(req)})
                    yield "data: [DONE]\n\n"
                finally:
                    finalize(req, http.url.path)
            return StreamingResponse(sse(), media_type="text/event-stream")
        reasons = await finish_reasons(req, http)
        choices = []
        for i, seq in enumerate(req.sequences):
            lp = {"content": _chat_logprobs(llm, seq.logprobs)} if body.logprobs else None
            choices.append({"index": i, "message": {"role": "assistant", "content": req.texts[i]},
                            "logprobs": lp, "finish_reason": _finish(reasons.get(i))})
        return {"id": rid, "object": "chat.completion", "created": created, "model": name,
                "choices": choices, "usage": _usage(req)}

    @app.post("/v1/embeddings")
    async def embeddings(body: P.EmbeddingRequest):
        local, remote = pick(body.model)
        if remote is not None:
            return await remote.proxy("embeddings", body.model_dump(exclude_none=True), False)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or any(not t for t in texts):
            raise APIError(400, "input must be a non-empty string or list of non-empty strings", "input")
        vectors = await asyncio.to_thread(_embed, llm, texts)
        tokens = sum(len(llm.tokenizer.encode(t, add_bos=False)) for t in texts)
        metrics.count_request("/v1/embeddings", 200)
        return {"object": "list", "model": local_name(),
                "data": [{"object": "embedding", "index": i,
                          "embedding": _base64(v) if body.encoding_format == "base64" else v}
                         for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    # -- LLMOS endpoints --

    @app.post("/api/write")
    async def write(body: P.WriteRequestBody, http: HTTPRequest):
        from llmos.writing import forms
        from llmos.writing.tasks import TaskError, WriteRequest, prepare_write

        local, remote = pick(body.model)
        if remote is not None:
            raise APIError(400, "writing tasks run on the local model here; use the OpenAI endpoints for remote ones", "model")
        req_w = WriteRequest(body.task, body.brief, body.variables, body.lang, body.form, body.n,
                             dict(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  seed=body.seed, logprobs=body.logprobs))
        try:
            prompt, params, stops, form = prepare_write(llm, req_w)
            ids = llm.encode_prompt(prompt)
        except (TaskError, forms.FormError) as e:
            raise APIError(400, str(e), "task" if "task" in str(e) else "form") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None
        params = with_eos(params)
        req = await submit(ids, params, body.n, stops)
        if body.stream:
            async def sse():
                def chunk(e):
                    return _sse({"index": e.index, "text": e.text, "finish_reason": e.finish_reason,
                                 "logprob": _chat_logprobs(llm, [e.logprob])[0] if e.logprob else None})

                try:
                    async for batch in batches_of(req, http):
                        yield "".join(map(chunk, batch))
                    yield "data: [DONE]\n\n"
                finally:
                    finalize(req, http.url.path)
            return StreamingResponse(sse(), media_type="text/event-stream")
        reasons = await finish_reasons(req, http)
        out = []
        for i, seq in enumerate(req.sequences):
            item = {"index": i, "text": req.texts[i], "finish_reason": _finish(reasons.get(i))}
            if form is not None:
                item["form_problems"] = forms.check(form, req.texts[i], acrostic=body.variables.get("acrostic"),
                                                    chars=int(body.variables["chars"]) if body.variables.get("chars") else None)
            if body.logprobs is not None:
                item["logprobs"] = _chat_logprobs(llm, seq.logprobs)
            out.append(item)
        return {"task": body.task, "model": local_name(), "candidates": out, "usage": _usage(req)}

    @app.post("/api/story/continue")
    async def story_continue(body: P.StoryContinueBody, http: HTTPRequest):
        """Server-sent events: first {"context": [...]} (what is sent and why), then one event per
        token {"text", "token", "logprob", "top": [[text, logprob], ...]}, then [DONE]."""

        from llmos.writing.story import LoreEntry, Story, StoryError, assemble_context

        story = Story(text=body.text, memory=body.memory, authors_note=body.authors_note,
                      authors_note_depth=body.authors_note_depth, lore_budget=body.lore_budget,
                      lorebook=[LoreEntry(e.keys, e.content, e.priority, e.enabled, constant=e.constant) for e in body.lorebook])
        try:
            prompt, parts = assemble_context(story, llm.tokenizer, scheduler.max_len, body.max_tokens)
            params = llm.sampling(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  top_k=body.top_k, min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                                  seed=body.seed, logprobs=body.logprobs)
        except (StoryError, ValueError) as e:
            raise APIError(400, str(e), _param_of(str(e))) from None
        params = with_eos(params)
        ids = llm.tokenizer.encode(prompt) if prompt else [llm.tokenizer.bos_id or 0]
        req = await submit(ids, params, 1, [])
        tok = llm.tokenizer

        async def sse():
            try:
                yield _sse({"context": [{"kind": p.kind, "tokens": p.tokens, "reason": p.reason, "text": p.text}
                                        for p in parts]})
                def chunk(e):
                    item = {"text": e.text, "finish_reason": e.finish_reason}
                    if e.logprob is not None and e.finish_reason is None:
                        item.update(token=e.logprob.token, logprob=e.logprob.logprob,
                                    top=[[tok.token_text(t), v] for t, v in e.logprob.top])
                    return _sse(item)

                async for batch in batches_of(req, http):
                    yield "".join(map(chunk, batch))
                yield "data: [DONE]\n\n"
            finally:
                finalize(req, http.url.path)
        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.get("/api/tasks")
    def tasks():
        from llmos.writing import list_tasks
        from llmos.writing.forms import FORMS

        return {"tasks": {k: {"description": t.description, "variables": t.variables, "languages": list(t.prompts)}
                          for k, t in list_tasks().items()},
                "forms": {k: {"kind": f.kind, "description": f.description} for k, f in FORMS.items()}}

    @app.get("/api/personas")
    def personas():
        from llmos.chat.personas import PersonaError, list_personas, read_persona_file

        found = []
        for row in list_personas():
            try:
                p = read_persona_file(row["path"])
            except PersonaError:
                continue  # an invalid file of the user's: `llmos personas` says why
            found.append({"name": p.name, "description": p.description, "greeting": p.greeting,
                          "system": p.system_prompt(), "builtin": row["builtin"]})
        return {"personas": found}

    @app.get("/health")
    def health():
        return {"status": "ok", "model": local_name(), "running": scheduler.running, "queued": scheduler.queue_depth}

    @app.get("/metrics")
    def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    # -- studio projects --

    @app.get("/api/projects")
    def list_projects():
        return {"projects": app.state.store.list_projects()}

    @app.post("/api/projects")
    async def create_project(http: HTTPRequest):
        body = await _json_object(http)
        return app.state.store.save_project(str(body.get("name") or "Untitled"), body.get("data") or {})

    @app.get("/api/projects/{project_id}")
    def get_project(project_id: int):
        try:
            return app.state.store.get_project(project_id)
        except KeyError:
            raise APIError(404, f"no project {project_id}", "project_id", "not_found_error") from None

    @app.put("/api/projects/{project_id}")
    async def put_project(project_id: int, http: HTTPRequest):
        body = await _json_object(http)
        try:
            return app.state.store.save_project(str(body.get("name") or "Untitled"), body.get("data") or {}, project_id)
        except KeyError:
            raise APIError(404, f"no project {project_id}", "project_id", "not_found_error") from None

    @app.delete("/api/projects/{project_id}")
    def delete_project(project_id: int):
        try:
            app.state.store.delete_project(project_id)
        except KeyError:
            raise APIError(404, f"no project {project_id}", "project_id", "not_found_error") from None
        return {"deleted": project_id}

    @app.get("/api/projects/{project_id}/export")
    def export_project(project_id: int, format: str = "json"):
        try:
            p = app.state.store.get_project(project_id)
        except KeyError:
            raise APIError(404, f"no project {project_id}", "project_id", "not_found_error") from None
        if format == "json":
            return Response(json.dumps(p, ensure_ascii=False, indent=2), media_type="application/json",
                            headers={"Content-Disposition": f'attachment; filename="project-{project_id}.json"'})
        if format in ("md", "markdown"):
            return Response(_markdown(p), media_type="text/markdown",
                            headers={"Content-Disposition": f'attachment; filename="project-{project_id}.md"'})
        raise APIError(400, "format must be json or md", "format")

    # -- the studio --

    @app.get("/", include_in_schema=False)
    def studio():
        return FileResponse(STATIC / "index.html")

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str):
        path = (STATIC / name).resolve()
        if path.parent != STATIC.resolve() or not path.is_file():
            raise APIError(404, "no such file", kind="not_found_error")
        return FileResponse(path)

    return app


async def _json_object(http: HTTPRequest) -> dict:
    try:
        body = await http.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the body must be JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    if "data" in body and not isinstance(body["data"], dict):
        raise APIError(400, "data must be an object", "data")
    return body


def _markdown(project: dict) -> str:
    data = project.get("data", {})
    lines = [f"# {project['name']}", ""]
    for key, title in (("memory", "Memory"), ("authors_note", "Author's Note")):
        if data.get(key):
            lines += [f"**{title}:** {data[key]}", ""]
    text = data.get("text")
    if text is None and isinstance(data.get("nodes"), dict) and data.get("current") in data["nodes"]:
        node, parts = data["current"], []
        while node is not None and node in data["nodes"]:
            parts.append(data["nodes"][node].get("text", ""))
            node = data["nodes"][node].get("parent")
        text = "".join(reversed(parts))
    lines.append(text or "")
    for entry in data.get("lorebook", []) or []:
        if isinstance(entry, dict):
            lines += ["", f"- **{', '.join(entry.get('keys', []))}**: {entry.get('content', '')}"]
    return "\n".join(lines) + "\n"


def _base64(vector: list[float]) -> str:
    import base64
    import struct

    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def _embed(llm, texts):
    return [v.tolist() for v in llm.embed(texts)]


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _finish(reason):
    return {"stop": "stop", "length": "length", "cancelled": "stop", None: "stop"}.get(reason, reason)


def _usage(req: Request) -> dict:
    generated = sum(len(s.output) for s in req.sequences)
    return {"prompt_tokens": len(req.prompt), "completion_tokens": generated, "total_tokens": len(req.prompt) + generated}


def _param_of(message: str) -> str | None:
    head = message.split(" ", 1)[0].strip(":")
    return head if head.replace("_", "").isalpha() else None


def _completion_logprobs(llm, lps) -> dict:
    tok = llm.tokenizer
    lps = [lp for lp in lps if lp is not None]
    return {"tokens": [tok.token_text(lp.token) for lp in lps],
            "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{tok.token_text(t): v for t, v in lp.top} for lp in lps],
            "text_offset": []}


def _chat_logprobs(llm, lps) -> list[dict]:
    tok = llm.tokenizer

    def item(token, logprob):
        text = tok.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return [{**item(lp.token, lp.logprob), "top_logprobs": [item(t, v) for t, v in lp.top]}
            for lp in lps if lp is not None]
