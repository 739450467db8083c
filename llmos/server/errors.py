"""Errors as the OpenAI API shapes them: every failure is an error object with a status, never
a bare 500 for bad input."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmos.server.protocol import error_body


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def not_found(what: str, param: str | None = None) -> APIError:
    return APIError(404, what, param, "not_found_error")


def param_of(message: str) -> str | None:
    """The parameter an error message starts with ("top_p must be ..." -> "top_p")."""
    head = message.split(" ", 1)[0].strip(":")
    return head if head.replace("_", "").isalpha() else None


def install(app: FastAPI):
    """Exception handlers that answer with error objects."""

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(error_body(exc.message, exc.param, exc.kind), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        first = exc.errors()[0]
        loc = [str(x) for x in first.get("loc", []) if x != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        return JSONResponse(error_body(f"{param}: {msg}" if param else msg, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc):
        return JSONResponse(error_body(str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        """A fault of the server's, not the request's: still an error object (and a traceback in
        the server's log, from uvicorn)."""
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", kind="server_error"), status_code=500)


def native_errors(shape):
    """A route class whose errors (an APIError, a request that fails validation) are answered
    in another server's error shape: shape(status, message, kind) -> the JSON body. Front ends
    written for KoboldCpp or Ollama read their own shape, not OpenAI's."""
    from fastapi.routing import APIRoute

    class NativeRoute(APIRoute):
        render = staticmethod(shape)  # the gate answers in it too (a bad key, body or Host)

        def get_route_handler(self):
            handler = super().get_route_handler()

            async def shaped(request):
                try:
                    return await handler(request)
                except RequestValidationError as exc:
                    first = exc.errors()[0]
                    where = ".".join(str(x) for x in first.get("loc", []) if x != "body")
                    message = f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg", "invalid request")
                    return JSONResponse(shape(400, message, "invalid_request_error"), status_code=400)
                except APIError as e:
                    return JSONResponse(shape(e.status, e.message, e.kind), status_code=e.status, headers=e.headers)

            return shaped

    return NativeRoute
