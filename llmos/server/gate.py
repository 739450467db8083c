"""The ASGI layer in front of every route: who may call (API key, Host, Origin), what they may
send (body size, JSON only, JSON that is sane), and the request count of /metrics.

Plain ASGI rather than an `@app.middleware` function, which would copy every streamed chunk
through an extra task and queue. It also sends a route's note about model choice back as the
X-LLMOS-Note header.

Why each check: a web page the user visits can reach a server on 127.0.0.1. Through DNS
rebinding it reads responses (its own host name resolving to 127.0.0.1), so only loopback Host
names are served unless configured; without rebinding it can still *send* a form or a
`text/plain` POST, so bodies must be declared JSON (a cross-site page cannot send that without a
CORS preflight, which is never granted) and a foreign Origin is refused on anything that changes
state.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass, field

from starlette.routing import Match

from llmos.server.protocol import error_body
from llmos.server.state import NOTE

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
OPEN_PATHS = ("/health",)  # answered without a key (load balancers, `llmos serve` checks)
STUDIO_PATHS = ("/", "/favicon.ico")  # the page asks for the key and sends it on its API calls
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Files sent as base64 JSON: character cards (PNG and CHARX, up to 20 MB: llmos/cards.py) and lorebooks
UPLOAD_PATHS = frozenset({"/api/personas/import", "/api/lorebooks/read"})
MAX_JSON_DEPTH = 64


@dataclass
class Policy:
    """What the gate lets through. allowed_hosts None: any Host header (a server bound beyond
    this machine, where the API key is the protection)."""

    limit: int = 1_000_000
    api_key: str | None = None
    allowed_hosts: frozenset[str] | None = field(default=LOOPBACK_HOSTS)
    upload_limit: int = 28 * 2**20  # on UPLOAD_PATHS: a 20 MB card in base64, with room to spare


class Rejected(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        self.status, self.message, self.kind = status, message, kind


def host_name(value: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '::1', 'Example.org' -> 'example.org'."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value[1:]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def origin_host(origin: str) -> str | None:
    """The host of an Origin header ('http://localhost:8000' -> 'localhost'); None for 'null'
    or anything that is not scheme://host."""
    scheme, sep, rest = origin.partition("://")
    if not sep or scheme not in ("http", "https") or not rest:
        return None
    return host_name(rest.split("/", 1)[0])


def json_problem(body: bytes) -> str | None:
    """Why a JSON body cannot be served (not JSON, nested too deep, a lone surrogate in a
    string), or None. Checked here once for every route, so no route meets a RecursionError or
    a string that cannot be encoded."""
    try:
        value = json.loads(body)
    except RecursionError:
        return f"the JSON body is nested too deeply (at most {MAX_JSON_DEPTH} levels)"
    except (ValueError, UnicodeDecodeError) as e:
        return f"the body is not valid JSON: {e}"
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return f"the JSON body is nested too deeply (at most {MAX_JSON_DEPTH} levels)"
        if isinstance(item, str):
            strings = (item,)
        elif isinstance(item, dict):
            strings = item.keys()
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            strings = ()
            stack.extend((v, depth + 1) for v in item)
        else:
            continue
        for s in strings:
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                return "a string in the JSON body holds a lone UTF-16 surrogate (\\ud800-\\udfff); send valid Unicode"
    return None


def is_json(content_type: str) -> bool:
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


class Gate:
    def __init__(self, app, policy: Policy, routes=None, count=None):
        """routes: () -> the app's routes (to label metrics by route template); count(template,
        status): records a finished request."""
        self.app, self.policy, self.routes, self.count = app, policy, routes, count

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 0

        async def send_counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                note = scope.get("state", {}).get(NOTE)
                if note:
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (b"x-llmos-note", note.encode("ascii", "replace"))]}
            await send(message)

        try:
            try:
                body = await self._admit(scope, receive)
            except Rejected as r:
                return await send_error(send_counted, r.status, r.message, r.kind, self.renderer(scope))
            if body is None:
                return  # the client went away before its body arrived
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return await self.app(scope, replay, send_counted)
        finally:
            if self.count and status:
                self.count(self.template(scope), status)

    async def _admit(self, scope, receive) -> bytes | None:
        """The request's body once every check passed; raises Rejected."""
        p, path, method = self.policy, scope.get("path", ""), scope.get("method", "GET")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        if p.allowed_hosts is not None and "host" in headers and host_name(headers["host"]) not in p.allowed_hosts:
            raise Rejected(403, f"Host {headers['host']!r} is not served here (this server answers to "
                                f"{', '.join(sorted(p.allowed_hosts))}; start it with --allowed-host NAME to add one)",
                           "permission_error")
        origin = headers.get("origin")
        if origin is not None and method not in SAFE_METHODS:
            host = origin_host(origin)  # the page's own origin: the server's name, or a trusted one
            same = host is not None and host == host_name(headers.get("host", ""))
            if not same and (host is None or p.allowed_hosts is None or host not in p.allowed_hosts):
                raise Rejected(403, f"requests from the web page at {origin} are refused: a page may not change "
                                    f"this server's data (start it with --allowed-host to trust a host)",
                               "permission_error")
        if p.api_key and not (path in OPEN_PATHS or path in STUDIO_PATHS or path.startswith("/static/")):
            given = headers.get("authorization", "").encode("latin-1")
            if not hmac.compare_digest(given, f"Bearer {p.api_key}".encode()):
                raise Rejected(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "authentication_error")
        limit = max(p.limit, p.upload_limit) if path in UPLOAD_PATHS else p.limit
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise Rejected(413, f"request body over {limit} bytes")
        parts, seen = [], 0  # read the (small, JSON) body here so an over-long one is a clean 413
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            seen += len(message.get("body", b""))
            if seen > limit:
                raise Rejected(413, f"request body over {limit} bytes")
            parts.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(parts)
        if body and method not in SAFE_METHODS:
            if not is_json(headers.get("content-type", "")):
                raise Rejected(415, "send the body as JSON, with the header 'Content-Type: application/json'")
            problem = json_problem(body)
            if problem:
                raise Rejected(400, problem)
        return body

    def renderer(self, scope):
        """The error shape of the route a request is for: a native API's (KoboldCpp, Ollama,
        llama.cpp: its route class's `render`), else None for OpenAI's."""
        for route in _leaves(self.routes() if self.routes else ()):
            match, _ = route.matches(scope)
            if match != Match.NONE:
                return getattr(route, "render", None)
        return None

    def template(self, scope) -> str:
        """The route a request went to, as its template ('/api/projects/{project_id}'): a label
        that cannot grow with the paths clients invent."""
        route = scope.get("route")
        if getattr(route, "path", None):
            return route.path
        for route in _leaves(self.routes() if self.routes else ()):  # refused before routing
            match, _ = route.matches(scope)
            if match != Match.NONE:  # PARTIAL: the path, with another method (405)
                return route.path
        return "(unmatched)"


def _leaves(routes):
    """The routes with a path, inside included routers too (none of them has a prefix)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _leaves(inner.routes)
        elif isinstance(getattr(route, "path", None), str) and hasattr(route, "matches"):
            yield route


async def send_error(send, status: int, message: str, kind: str = "invalid_request_error", render=None):
    """An error answer in OpenAI's shape, or in render(status, message, kind)'s."""
    body = json.dumps(render(status, message, kind) if render else error_body(message, kind=kind)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
