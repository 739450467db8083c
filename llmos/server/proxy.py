"""The server's pass-through to remote models (llmos/remote.py): an OpenAI request in, an
OpenAI response out, streamed or not. OpenAI-compatible servers are relayed as they answer;
Anthropic's messages API is translated."""

from __future__ import annotations

import asyncio

import httpx
from fastapi.responses import JSONResponse, StreamingResponse

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

        async def relay():
            try:
                async for chunk in resp.aiter_raw():
                    yield chunk
            finally:
                await resp.aclose()
                await client.aclose()

        return StreamingResponse(relay(), status_code=resp.status_code, media_type="text/event-stream")
    try:
        resp = await client.post(url, json=body, headers=remote.headers())
    except httpx.HTTPError as e:
        return _unreachable(remote, e)
    finally:
        await client.aclose()
    data = resp.json() if resp.headers.get("content-type", "").startswith("application/json") else {"error": resp.text}
    if isinstance(data, dict) and "model" in data:
        data["model"] = remote.name
    return JSONResponse(data, status_code=resp.status_code)


async def _anthropic(remote: RemoteModel, body: dict, stream: bool):
    messages, params = body.get("messages", []), params_from(body)
    if stream:
        def events():
            rid = new_id("chatcmpl")
            for piece in remote.stream_chat(messages, params):
                yield sse({"id": rid, "object": "chat.completion.chunk", "created": now(), "model": remote.name,
                           "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
            yield DONE

        return StreamingResponse(events(), media_type="text/event-stream")
    try:
        text, reason, usage = await asyncio.to_thread(remote.anthropic_chat, messages, params)
    except RemoteError as e:
        return JSONResponse(error_body(str(e), kind="server_error"), 502)
    return JSONResponse({"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": remote.name,
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": reason}], "usage": usage})
