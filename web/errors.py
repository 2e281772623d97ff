"""The only place where an exception becomes an HTTP response (STYLE.md rule 7).

Under /api/, /hooks/ and for the pages' JSON endpoints (paths ending in `.json`) every error is
`{"error": {"code", "message", "field"?}}`; everywhere else it is an HTML page. Messages are one line, never a
traceback, and pass through `scrub()` so no token can leave in an error.
"""

from __future__ import annotations

import logging
import time

from flask import Flask, current_app, jsonify, make_response, render_template, request
from werkzeug.exceptions import HTTPException

from worker.redact import scrub

from .hubcheck import InspectError

log = logging.getLogger("lorafold.web")


class WebError(Exception):
    """An error with its HTTP status, a stable machine code and a message for people."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, field: str | None = None, *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.headers = headers or {}


class BadRequest(WebError):
    status, code = 400, "bad_request"


class Unauthorized(WebError):
    status, code = 401, "unauthorized"


class Forbidden(WebError):
    """The caller may see the resource but not act on it (seeing is already checked: never a way to probe ids)."""

    status, code = 403, "forbidden"


class NotFound(WebError):
    status, code = 404, "not_found"


class Conflict(WebError):
    status, code = 409, "conflict"


class PayloadTooLarge(WebError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(WebError):
    status, code = 415, "unsupported_media_type"


class Unprocessable(WebError):
    status, code = 422, "invalid"


class TooManyRequests(WebError):
    """A per-owner cap (queued jobs): the caller should wait; Retry-After says roughly how long."""

    status, code = 429, "rate_limited"

    def __init__(self, message: str, retry_after: int, field: str | None = None):
        super().__init__(message, field, headers={"Retry-After": str(max(1, int(retry_after)))})


class HubUnavailable(WebError):
    status, code = 503, "hub_unavailable"


_HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    406: "not_acceptable", 409: "conflict", 413: "payload_too_large", 414: "uri_too_long", 415: "unsupported_media_type",
    422: "invalid", 429: "rate_limited", 431: "headers_too_large", 503: "unavailable",
}


def wants_json() -> bool:
    path = request.path
    return path.startswith(("/api/", "/hooks/")) or path.endswith(".json") or path == "/healthz"


def error_response(status: int, code: str, message: str, field: str | None = None, headers: dict | None = None):
    message = scrub(" ".join(str(message).split()))[:500]
    if wants_json():
        body: dict = {"code": code, "message": message}
        if field is not None:
            body["field"] = field
        response = jsonify(error=body)
    else:
        try:
            response = make_response(render_template("error.html", status=status, message=message), status)
        except Exception:  # noqa: BLE001 - the error page itself failed: plain text still tells the user
            log.exception("error page failed to render")
            response = make_response(f"Error {status}: {message}\n", status, {"Content-Type": "text/plain; charset=utf-8"})
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    if status == 401 and request.path.startswith("/api/"):
        response.headers.setdefault("WWW-Authenticate", 'Bearer realm="lorafold"')
    return response


def register(app: Flask) -> None:
    @app.errorhandler(WebError)
    def _web_error(exc: WebError):
        return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)

    @app.errorhandler(InspectError)
    def _inspect_error(exc: InspectError):
        return error_response(422, "invalid", exc.message, exc.field)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        status = exc.code or 500
        headers = {}
        valid = getattr(exc, "valid_methods", None)
        if status == 405 and valid:
            headers["Allow"] = ", ".join(valid)
        if status == 429:
            headers["Retry-After"] = str(_retry_after())
            message = f"rate limit exceeded ({exc.description}); retry after {headers['Retry-After']} s"
        elif status == 413:
            message = "request body too large"
        elif status == 400 and type(exc).__name__ == "CSRFError":
            message = f"the form expired or was not sent from this site ({exc.description}); reload the page and try again"
        else:
            message = exc.description or exc.name
        if status >= 500:
            log.error("http error %s on %s %s", status, request.method, request.path)
        return error_response(status, _HTTP_CODES.get(status, "error"), message, headers=headers)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled %s on %s %s", type(exc).__name__, request.method, request.path)
        return error_response(500, "internal_error", "internal error; it was logged, please try again or report it")


def _retry_after() -> int:
    """Seconds until the breached limit's window resets (Flask-Limiter also sets the header when it can)."""
    limiter = current_app.extensions.get("lorafold_limiter")
    try:
        current = limiter.current_limit if limiter is not None else None
        if current is not None:
            return max(1, int(current.reset_at - time.time()))
    except Exception:  # noqa: BLE001 - storage hiccup: a safe default
        pass
    return 60
