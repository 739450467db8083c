"""Getting generation out to HTTP clients: submitting to a scheduler, reading a request's
events, server-sent events, and running a synchronous pipeline (a chat turn, a novel) in a
worker thread while its output streams. Every streaming route uses these."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator

from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse

from llmos.engine.generate import Event, Request
from llmos.server.errors import APIError
from llmos.server.protocol import error_body
from llmos.server.scheduler import Pipeline, QueueFull


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"
BUSY = "the server is busy: too many requests are waiting; retry shortly"


async def submit(served, req: Request, timeout: float):
    """Queue a request on a served model's scheduler; 429 when too many wait, 400 when it can
    never run there (a prompt longer than the context)."""
    req.deadline = time.monotonic() + timeout
    try:
        served.scheduler.submit(req, asyncio.get_running_loop())
    except QueueFull:
        raise APIError(429, BUSY, kind="rate_limit_error", headers={"Retry-After": "1"}) from None
    except ValueError as e:
        raise APIError(400, str(e), "prompt") from None


async def watch_disconnect(http: HTTPRequest, on_disconnect: Callable[[], None]):
    """Call on_disconnect the moment the client goes away. The body has been read by then (the
    gate reads it whole), so the only message left to receive is the disconnect."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            on_disconnect()
            return


async def batches(req: Request, http: HTTPRequest) -> AsyncIterator[list[Event]]:
    """A submitted request's events until every candidate has ended, in lists of those already
    waiting (a client behind by several tokens gets them in one write). A client that goes away
    cancels the request at once (its rows are freed at the next step), streamed or not."""
    inbox, ended = req.owner, 0

    def gone():
        req.cancel()
        inbox.queue.put_nowait(None)

    watcher = asyncio.create_task(watch_disconnect(http, gone))
    try:
        while ended < req.n:
            got = [await inbox.queue.get()]
            while not inbox.queue.empty():
                got.append(inbox.queue.get_nowait())
            if None in got:
                return
            batch = [e for events in got for e in events]
            for e in batch:
                if e.finish_reason == "error":
                    raise APIError(500, f"generation failed: {e.text}", kind="server_error")
            ended += sum(e.finish_reason is not None for e in batch)
            yield batch
    finally:
        watcher.cancel()
        if ended < req.n:
            req.cancel()


async def finish(req: Request, http: HTTPRequest) -> dict[int, str]:
    """Wait for a non-streamed request to end: each candidate's finish reason."""
    reasons = {}
    async for batch in batches(req, http):
        reasons.update((e.index, e.finish_reason) for e in batch if e.finish_reason)
    return reasons


def event_stream(req: Request, http: HTTPRequest, chunk: Callable[[Event], str | None], *,
                 head: Iterable[str] = (), tail: Callable[[], Iterable[str]] | None = None,
                 on_end: Callable[[], None] | None = None) -> StreamingResponse:
    """Server-sent events of a request: `head`, then `chunk(event)` for each event (None skips
    it), then `tail()` and [DONE]. An error after the response has started is sent as an
    OpenAI error object, since the status line is gone by then."""

    async def body():
        try:
            for item in head:
                yield item
            async for batch in batches(req, http):
                text = "".join(c for c in map(chunk, batch) if c)
                if text:
                    yield text
            for item in tail() if tail else ():
                yield item
            yield DONE
        except APIError as e:
            yield sse(error_body(e.message, e.param, e.kind))
        finally:
            if on_end:
                on_end()

    return StreamingResponse(body(), media_type="text/event-stream")


async def in_thread(make: Callable[[], Iterator], http: HTTPRequest | None = None) -> AsyncIterator:
    """Run a synchronous iterator (a chat turn, a novel's stages) in a thread of its own and
    yield its items here as they come. Generation inside it goes through the scheduler, so it
    shares the batch. A client that goes away ends the pipeline's generation at the next decode
    step and stops it before it starts another (it keeps what it wrote so far); an exception in
    it is raised here."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue = asyncio.Queue()
    pipeline = Pipeline()

    def work():
        Pipeline.current.value = pipeline
        try:
            it = make()
            try:
                for item in it:
                    loop.call_soon_threadsafe(items.put_nowait, ("item", item))
                    if pipeline.abandoned:
                        break
            finally:
                close = getattr(it, "close", None)
                if close:
                    close()
            loop.call_soon_threadsafe(items.put_nowait, ("end", None))
        except BaseException as e:  # handed to the event loop, raised there
            try:
                loop.call_soon_threadsafe(items.put_nowait, ("error", e))
            except RuntimeError:
                pass

    threading.Thread(target=work, name="llmos-pipeline", daemon=True).start()
    watcher = None
    if http is not None:
        watcher = asyncio.create_task(watch_disconnect(http, lambda: items.put_nowait(("gone", None))))
    try:
        while True:
            kind, item = await items.get()
            if kind in ("end", "gone"):
                return
            if kind == "error":
                raise item
            yield item
    finally:
        if watcher is not None:
            watcher.cancel()
        pipeline.abandon()  # a pipeline left early: its generation ends at the next step
