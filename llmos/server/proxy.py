"""The server's pass-through to remote models (llmos/remote.py): an OpenAI request in, an
OpenAI response out, streamed or not. OpenAI-compatible servers are relayed as they answer;
Anthropic's messages API is translated."""

from __future__ import annotations

import asyncio

import httpx
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from llmos.remote import RemoteError, RemoteModel, params_from
from llmos.server.protocol import error_body, new_id, now
from llmos.server.streaming import DONE, sse


def _unreachable(remote: RemoteModel, e: Exception) -> JSONResponse:
    return JSONResponse(error_body(f"remote model {remote.name} unreachable: {e}", kind="server_error"), 502)


async def proxy(remote: RemoteModel, endpoint: str, body: dict, stream: bool):
    """Forward `body` to the remote's `endpoint` ("completions", "chat/completions", "embeddings")."""
    body = {**body, "model": remote.model}
    if remote.kind == "anthropic":
        if endpoint != "chat/completions":
            return JSONResponse(error_body(f"{remote.name} (Anthropic) serves chat completions only", "model"), 400)
        return await _anthropic(remote, body, stream)
    url = f"{remote.base_url.rstrip('/')}/{endpoint}"
    client = httpx.AsyncClient(timeout=remote.timeout)
    if stream:
        try:
            resp = await client.send(client.build_request("POST", url, json=body, headers=remote.headers()), stream=True)
        except httpx.HTTPError as e:
            await client.aclose()
            return _unreachable(remote, e)
        except BaseException:
            await client.aclose()
            raise

        async def close():
            await resp.aclose()
            await client.aclose()

        if resp.status_code >= 400:  # the remote's error, as the non-streamed path relays it
            try:
                await resp.aread()
            finally:
                await close()
            return _relayed(remote, resp)

        async def relay():
            try:
                async for chunk in resp.aiter_raw():
                    yield chunk
            except httpx.HTTPError as e:  # the remote went away mid-stream: the status line is sent
                yield sse(error_body(f"remote model {remote.name} stopped answering: {e}", kind="server_error")).encode()

        # The background task runs however the response ends, even when the client left before
        # the first chunk (when the generator's own cleanup would never run).
        return StreamingResponse(relay(), status_code=resp.status_code, media_type="text/event-stream",
                                 background=BackgroundTask(close))
    try:
        resp = await client.post(url, json=body, headers=remote.headers())
    except httpx.HTTPError as e:
        return _unreachable(remote, e)
    finally:
        await client.aclose()
    return _relayed(remote, resp)


def _relayed(remote: RemoteModel, resp: httpx.Response) -> JSONResponse:
    """A remote's whole answer, under the name it is served by here."""
    try:
        data = resp.json()
    except ValueError:  # not JSON: an error page, a proxy's answer
        data = error_body(f"remote model {remote.name} answered {resp.status_code}: {resp.text[:300]}",
                          kind="server_error")
    if isinstance(data, dict) and "model" in data:
        data["model"] = remote.name
    return JSONResponse(data, status_code=resp.status_code if resp.status_code < 500 else 502)


async def _anthropic(remote: RemoteModel, body: dict, stream: bool):
    messages, params = body.get("messages", []), params_from(body)
    if stream:
        pieces = remote.stream_chat(messages, params)
        try:  # the first piece before the status line: an unreachable remote is a 502, not a broken stream
            first = await asyncio.to_thread(next, pieces, None)
        except RemoteError as e:
            return JSONResponse(error_body(str(e), kind="server_error"), 502)

        def events():
            rid = new_id("chatcmpl")
            try:
                if first is not None:
                    yield chunk(rid, first)
                    for piece in pieces:
                        yield chunk(rid, piece)
            except RemoteError as e:
                yield sse(error_body(str(e), kind="server_error"))
            finally:
                pieces.close()
            yield DONE

        def chunk(rid, piece):
            return sse({"id": rid, "object": "chat.completion.chunk", "created": now(), "model": remote.name,
                        "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})

        return StreamingResponse(events(), media_type="text/event-stream")
    try:
        text, reason, usage = await asyncio.to_thread(remote.anthropic_chat, messages, params)
    except RemoteError as e:
        return JSONResponse(error_body(str(e), kind="server_error"), 502)
    return JSONResponse({"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": remote.name,
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": reason}], "usage": usage})
