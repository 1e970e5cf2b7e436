"""OpenAI-style error bodies and FastAPI handlers that always answer with them."""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
}


def error_type_for(status: int) -> str:
    """The error `type` for an HTTP status; unknown 4xx → invalid_request_error, 5xx → internal_error."""
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "internal_error" if status >= 500 else "invalid_request_error"


class APIError(Exception):
    """An error to be answered as `{"object": "error", ...}` with HTTP status `status`."""

    def __init__(self, status: int, message: str, type_: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_ or error_type_for(status)

    def body(self) -> dict[str, Any]:
        """The JSON body for this error (also usable as a final SSE event)."""
        return error_body(self.status, self.message, self.type)

    def __repr__(self) -> str:
        return f"APIError({self.status}, {self.message!r}, {self.type!r})"


def check_secret(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a secret the client sent with the expected one."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def require_join_token(request: Request, join_token: str | None) -> None:
    """401 unless the request carries the cluster's join token (X-Join-Token), when it has one."""
    if join_token is not None and not check_secret(request.headers.get("x-join-token"),
                                                   join_token):
        raise APIError(401, "missing or wrong join token (header X-Join-Token)")


def error_body(status: int, message: str, type_: str | None = None) -> dict[str, Any]:
    """`{"object": "error", "message", "type", "code": status}`."""
    return {
        "object": "error",
        "message": message,
        "type": type_ or error_type_for(status),
        "code": status,
    }


def error_response(exc: APIError) -> JSONResponse:
    """A JSONResponse carrying `exc`'s body and status."""
    return JSONResponse(status_code=exc.status, content=exc.body())


def _format_validation_errors(errors: Any) -> str:
    """Turn FastAPI/pydantic validation errors into one readable line."""
    parts: list[str] = []
    for err in errors or []:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc)
        msg = err.get("msg", "invalid value")
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            detail = ctx.get("error")
            return f"request body is not valid JSON{': ' + str(detail) if detail else ''}"
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    """Make every error `app` answers an OpenAI-style JSON error body (never HTML or a traceback).

    Covers APIError, request validation errors (including malformed JSON bodies), HTTP exceptions
    (404 for unknown routes, 405...), JSON decode errors raised by handlers, and any unexpected
    exception (500).
    """

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(APIError(400, _format_validation_errors(exc.errors())))

    @app.exception_handler(json.JSONDecodeError)
    async def _json_error(_request: Request, exc: json.JSONDecodeError) -> JSONResponse:
        return error_response(APIError(400, f"request body is not valid JSON: {exc.msg}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return JSONResponse(
            status_code=exc.status_code,
            content=error_body(exc.status_code, message),
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error while serving a request", exc_info=exc)
        return error_response(APIError(500, f"internal error: {type(exc).__name__}"))
