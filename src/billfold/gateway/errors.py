"""Every error as RFC 9457 problem+json: our own, validation, routing and the unexpected."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as SATimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from billfold.platform.errors import PROBLEM_CONTENT_TYPE, FieldError, ProblemError
from billfold.platform.observability import redact_text, request_id_var

_HTTP_CODES = {
    400: ("bad_request", "Bad request"),
    401: ("unauthorized", "Unauthorized"),
    403: ("forbidden", "Forbidden"),
    404: ("not_found", "Not found"),
    405: ("method_not_allowed", "Method not allowed"),
    406: ("not_acceptable", "Not acceptable"),
    413: ("payload_too_large", "Payload too large"),
    415: ("unsupported_media_type", "Unsupported media type"),
    429: ("rate_limited", "Too many requests"),
}


def problem_response(
    error: ProblemError,
    instance: str | None = None,
    extra_headers: list[tuple[str, str]] | None = None,
) -> Response:
    body = json.dumps(error.to_problem(instance=instance, request_id=request_id_var.get()))
    response = Response(body, status_code=error.status, media_type=PROBLEM_CONTENT_TYPE)
    for k, v in error.headers.items():
        response.headers[k] = v
    for k, v in extra_headers or []:
        response.headers[k] = v
    return response


def _location(loc: tuple[Any, ...]) -> dict[str, str]:
    where, *rest = loc or ("body",)
    path = "/".join(str(p).replace("~", "~0").replace("/", "~1") for p in rest)
    path = redact_text(path)  # a card number sent as a member name is not echoed back
    if where == "body":
        return {"pointer": "#/" + path if path else "#"}
    if where == "header":
        return {"header": path}
    return {"parameter": path or str(where)}


def validation_problem(exc: RequestValidationError) -> ProblemError:
    errors: list[FieldError] = []
    for err in exc.errors():
        kind = err.get("type", "invalid")
        if kind == "json_invalid":
            return ProblemError("The request body is not valid JSON", code="malformed_json")
        msg = str(err.get("msg", "invalid value"))
        # Value errors from our validators carry their message after this prefix.
        msg = redact_text(msg.removeprefix("Value error, "))
        errors.append(FieldError(detail=msg, code=kind, **_location(tuple(err.get("loc", ())))))
    return ProblemError(
        "The request has invalid fields; see `errors`",
        status=422,
        code="validation_failed",
        title="Unprocessable request",
        errors=errors,
    )


# SQLSTATEs that mean "try again": the work was rolled back because of other work running at the
# same time, not because of anything wrong with the request.
_TRANSIENT_SQLSTATES = {
    "40001": "serialization_failure",
    "40P01": "deadlock_detected",
    "55P03": "lock_not_available",  # lock_timeout
    "57014": "query_canceled",  # statement_timeout
    # PostgreSQL has no connection slot left (max_connections, or a role's limit): the request
    # did nothing, and a retry a moment later may find one (seen at 500 payments in flight
    # while other processes held most of the server's 100 slots).
    "53300": "too_many_connections",
}


def transient_problem(exc: BaseException) -> ProblemError | None:
    """A 503 `database_busy` (with Retry-After) for an error that a retry may not meet: a
    deadlock, a serialisation failure, a lock or statement timeout, a pool checkout timeout.
    None for anything else (a bug, which stays a logged 500)."""
    if isinstance(exc, SATimeoutError):  # no pooled connection became free in time
        reason = "pool_timeout"
    elif isinstance(exc, DBAPIError):
        reason = _TRANSIENT_SQLSTATES.get(str(getattr(exc.orig, "sqlstate", "") or ""), "")
        if not reason:
            return None
    else:
        return None
    return ProblemError(
        "billfold is busy with other changes to the same data and could not finish this "
        "request. Retry it with the same Idempotency-Key: it is never applied twice.",
        status=503,
        code="database_busy",
        title="Busy, retry shortly",
        headers={"Retry-After": "1"},
        extra={"reason": reason},
    )


def install_error_handlers(app: FastAPI) -> None:
    async def on_problem(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ProblemError)
        return problem_response(exc, instance=request.url.path)

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return problem_response(validation_problem(exc), instance=request.url.path)

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code, title = _HTTP_CODES.get(exc.status_code, ("http_error", "HTTP error"))
        detail = exc.detail if isinstance(exc.detail, str) and exc.status_code != 404 else None
        if exc.status_code == 404:
            detail = "No such resource"
        error = ProblemError(
            detail, status=exc.status_code, code=code, title=title, headers=dict(exc.headers or {})
        )
        return problem_response(error, instance=request.url.path)

    app.add_exception_handler(ProblemError, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
