"""The ASGI layer in front of every route: the API key (401) and the body size limit (413,
declared or not). Plain ASGI rather than an `@app.middleware` function, which would copy every
streamed chunk through an extra task and queue. It also sends a route's note about model choice
back as the X-LLMOS-Note header."""

from __future__ import annotations

import json

from llmos.server.protocol import error_body
from llmos.server.state import NOTE


class Gate:
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
            await send_error(send, status, message, kind)

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

        async def send_with_note(message):
            if message["type"] == "http.response.start":
                note = scope.get("state", {}).get(NOTE)
                if note:
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (b"x-llmos-note", note.encode("ascii", "replace"))]}
            await send(message)

        return await self.app(scope, replay, send_with_note)


async def send_error(send, status: int, message: str, kind: str = "invalid_request_error"):
    body = json.dumps(error_body(message, kind=kind)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
