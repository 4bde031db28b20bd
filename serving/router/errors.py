"""Every error the gateway answers is an OpenAI-style JSON body (`{"error": {"message", "type",
"param", "code"}}`) with the status that tells the client what to do: 400 never servable as sent,
429 retry later, 503 nothing is up. This module holds the error type, the body, and the middleware
that turns aiohttp's own answers (unknown path, wrong method, body too large) and any bug into one.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from aiohttp import web

log = logging.getLogger("gpufleet.router")

# The `type` field by status, as OpenAI's API names them.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "NotFoundError",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    502: "service_unavailable",
    503: "service_unavailable",
    504: "service_unavailable",
}


def error_type(status: int) -> str:
    return _TYPES.get(status, "invalid_request_error" if status < 500 else "internal_server_error")


class HttpError(Exception):
    """Answered to the client as an OpenAI-style error body. `close`: end the connection after it
    (the request's body was not read to its end)."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str | None = None,
        headers: dict[str, str] | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.type = type_ or error_type(status)
        self.headers = headers or {}
        self.close = close

    def response(self) -> web.Response:
        resp = error_response(self.status, self.message, self.type, self.headers)
        if self.close:
            resp.force_close()
        return resp


def error_body(status: int, message: str, type_: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": status}}


def error_response(
    status: int, message: str, type_: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(error_body(status, message, type_ or error_type(status)), status=status, headers=headers)


def upstream_error(status: int, data: bytes, headers: dict[str, str]) -> web.Response:
    """An engine's (or peer's) error answer for the client: relayed as it is when it is a JSON
    object, else wrapped in an OpenAI-style body with the same status (a proxy's text page, say)."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        body = None
    if isinstance(body, dict):
        return web.Response(status=status, body=data, headers=headers)
    headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
    return error_response(status, f"the engine answered {status}: {snippet(data)}", headers=headers)


def snippet(data: bytes, limit: int = 300) -> str:
    """An error body as one short line of text for a message: the `message` of a JSON error, else
    the text itself, cut at `limit` characters."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        inner: dict = error if isinstance(error, dict) else body
        if isinstance(inner.get("message"), str):
            return inner["message"][:limit]
    text = " ".join(data.decode("utf-8", "replace").split())
    return text[:limit] or "(empty body)"


@web.middleware
async def json_errors(request: web.Request, handler) -> web.StreamResponse:
    """aiohttp's own error answers (404 unknown path, 405 wrong method, 413 body too large) and any
    unexpected exception become OpenAI-style JSON errors; a bug answers 500 and is logged (the log
    filter in logs.py counts repeats)."""
    try:
        return await handler(request)
    except HttpError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = {
            404: f"no route {request.path}",
            405: f"method {request.method} is not allowed on {request.path}",
        }.get(exc.status, exc.reason)
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return error_response(exc.status, message, headers=headers)
    except ConnectionError:
        raise  # the client went away: nobody to answer
    except Exception:
        log.exception("error handling %s %s", request.method, request.path)
        return error_response(500, "internal error in the router (logged)")


def status_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "error"
