"""RFC 9457 problem details: every error billfold answers has a stable `code` and `type`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from billfold.platform.observability import redact_text

PROBLEM_TYPE_BASE = "https://docs.billfold.dev/problems/"
PROBLEM_CONTENT_TYPE = "application/problem+json"


class FieldError(BaseModel):
    pointer: str | None = Field(
        default=None, description="JSON Pointer (RFC 6901) into the body, e.g. `#/email`"
    )
    parameter: str | None = Field(default=None, description="Query or path parameter name")
    header: str | None = Field(default=None, description="Request header name")
    detail: str
    code: str = "invalid"


class Problem(BaseModel):
    """The body of every error response (`application/problem+json`)."""

    type: str
    title: str
    status: int
    code: str
    detail: str | None = None
    instance: str | None = None
    errors: list[FieldError] | None = None
    request_id: str | None = None


class ProblemError(Exception):
    """Raise anywhere to answer with a problem; the gateway renders it."""

    status: int = 400
    code: str = "bad_request"
    title: str = "Bad request"

    def __init__(
        self,
        detail: str | None = None,
        *,
        status: int | None = None,
        code: str | None = None,
        title: str | None = None,
        errors: list[FieldError] | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.status = status or type(self).status
        self.code = code or type(self).code
        self.title = title or type(self).title
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}
        self.extra = extra or {}
        super().__init__(detail or self.code)

    def to_problem(
        self, instance: str | None = None, request_id: str | None = None
    ) -> dict[str, Any]:
        # `instance` is the request path: a card number typed into a URL is not echoed back.
        instance = redact_text(instance) if instance else instance
        body = Problem(
            type=PROBLEM_TYPE_BASE + self.code,
            title=self.title,
            status=self.status,
            code=self.code,
            detail=self.detail,
            instance=instance,
            errors=self.errors,
            request_id=request_id,
        ).model_dump(exclude_none=True)
        body.update(self.extra)
        return body


class NotFound(ProblemError):
    status, code, title = 404, "not_found", "Not found"


class Conflict(ProblemError):
    status, code, title = 409, "conflict", "Conflict"


class Unauthorized(ProblemError):
    status, code, title = 401, "unauthorized", "Unauthorized"


class Forbidden(ProblemError):
    status, code, title = 403, "forbidden", "Forbidden"


class Unprocessable(ProblemError):
    status, code, title = 422, "validation_failed", "Unprocessable request"


class TooManyRequests(ProblemError):
    status, code, title = 429, "rate_limited", "Too many requests"


class ServiceUnavailable(ProblemError):
    status, code, title = 503, "service_unavailable", "Service unavailable"


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting the problem codes a route may answer."""
    described = {
        400: "Malformed request",
        401: "Missing or invalid credentials (`unauthorized`, `invalid_token`)",
        403: "Authenticated but not allowed (`forbidden`, `insufficient_scope`)",
        404: "No such resource, or not yours (`not_found`)",
        409: "Conflict with current state (`conflict`, `idempotency_request_in_progress`)",
        413: "Body too large (`payload_too_large`)",
        415: "Unsupported media type (`unsupported_media_type`)",
        422: "Validation failed (`validation_failed` with `errors[].pointer`, "
        "`idempotency_key_reuse`)",
        429: "Rate limited (`rate_limited`, `too_many_attempts`), see `Retry-After`",
    }
    return {
        s: {
            "model": Problem,
            "description": described.get(s, "Error"),
            "content": {PROBLEM_CONTENT_TYPE: {}},
        }
        for s in statuses
    }
