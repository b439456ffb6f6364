"""Typed errors for both transports, mapped from status codes in exactly one place each."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Mapping
from typing import Any

import grpc


class FlywheelError(Exception):
    """Base class. `status` is the HTTP status, `code` the gRPC status name, `field` the
    offending request field when the server named one, `retry_after` the seconds the server
    asked an overloaded or rate-limited caller to wait (None when it said nothing)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        field: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.field = field
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, status={self.status}, "
            f"code={self.code}, field={self.field})"
        )


class InvalidArgument(FlywheelError):
    """The request was malformed or out of bounds (400/413/422, INVALID_ARGUMENT)."""


class NotFound(FlywheelError):
    """An id or version the server does not know (404, NOT_FOUND)."""


class Conflict(FlywheelError):
    """Valid, but the server's current state refuses it (409, FAILED_PRECONDITION)."""


class Overloaded(FlywheelError):
    """The server is at capacity; retry later (429, RESOURCE_EXHAUSTED)."""


class Unauthenticated(FlywheelError):
    """Missing or unknown API key (401, UNAUTHENTICATED)."""


class PermissionDenied(FlywheelError):
    """The API key lacks the scope this call needs (403, PERMISSION_DENIED)."""


class Unavailable(FlywheelError):
    """The server could not be reached or is not ready (503, UNAVAILABLE, connection errors)."""


GRPC_ERRORS: Mapping[grpc.StatusCode, type[FlywheelError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: Conflict,
    grpc.StatusCode.ALREADY_EXISTS: Conflict,
    grpc.StatusCode.ABORTED: Conflict,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    # A deadline is the client giving up on a slow or unreachable server: retryable, like 503.
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
}

HTTP_ERRORS: Mapping[int, type[FlywheelError]] = {
    400: InvalidArgument,
    401: Unauthenticated,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    413: InvalidArgument,
    422: InvalidArgument,
    429: Overloaded,
    502: Unavailable,
    503: Unavailable,
    504: Unavailable,
}

# OpenAI error `type`s; they classify an error reported inside an SSE stream, where the HTTP
# status is already 200.
HTTP_ERROR_TYPES: Mapping[str, type[FlywheelError]] = {
    "invalid_request_error": InvalidArgument,
    "not_found_error": NotFound,
    "conflict_error": Conflict,
    "rate_limit_error": Overloaded,
    "authentication_error": Unauthenticated,
    "permission_error": PermissionDenied,
}

# The server may name the offending field in a trailing metadata entry of this key; gRPC's
# status has no field slot without the optional grpcio-status package.
FIELD_METADATA_KEY = "field"
# An overloaded or rate-limited server says how long to wait: HTTP's Retry-After header, and
# trailing metadata of this key on gRPC, both in seconds.
RETRY_AFTER_KEY = "retry-after"


def from_grpc_error(error: grpc.RpcError) -> FlywheelError:
    """The typed error for a failed gRPC call."""
    code = error.code() if callable(getattr(error, "code", None)) else None
    details = error.details() if callable(getattr(error, "details", None)) else None
    trailing = (
        error.trailing_metadata() if callable(getattr(error, "trailing_metadata", None)) else None
    )
    wanted = (FIELD_METADATA_KEY, RETRY_AFTER_KEY)  # others may be binary (-bin) entries
    values = {
        key: value if isinstance(value, str) else value.decode("utf-8", "replace")
        for key, value in trailing or ()
        if key in wanted
    }
    cls = GRPC_ERRORS.get(code, FlywheelError) if code is not None else FlywheelError
    name = code.name if code is not None else None
    return cls(
        details or name or str(error),
        code=name,
        field=values.get(FIELD_METADATA_KEY),
        retry_after=_seconds(values.get(RETRY_AFTER_KEY)),
    )


def _seconds(value: str | None) -> float | None:
    """A Retry-After in seconds (HTTP's date form is not used by this server), or None."""
    try:
        seconds = float(value) if value is not None else math.nan
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def from_http_error(
    status: int | None, body: Any, headers: Mapping[str, str] | None = None
) -> FlywheelError:
    """The typed error for an HTTP error response, or for an error event in an SSE stream
    (`status` None: the body's `code`, else its `type`, decides); `headers` give Retry-After.

    `body` is the response body as bytes, text or decoded JSON; the OpenAI error shape
    `{"error": {"message", "type", "param", "code"}}` gives the message and the field.
    """
    if isinstance(body, bytes | bytearray):
        body = body.decode("utf-8", errors="replace")
    if isinstance(body, str):
        with contextlib.suppress(ValueError):
            body = json.loads(body)
    message, field, kind = None, None, None
    if isinstance(body, Mapping):
        error = body.get("error")
        if isinstance(error, Mapping):
            message, field, kind = error.get("message"), error.get("param"), error.get("type")
            if status is None and isinstance(error.get("code"), int):
                status = error["code"]
        elif isinstance(error, str):
            message = error
        elif isinstance(body.get("detail"), str):  # Starlette's default error shape
            message = body["detail"]
    elif isinstance(body, str) and body.strip():
        message = body.strip()
    if status is not None:
        cls = HTTP_ERRORS.get(status, FlywheelError)
    else:
        cls = HTTP_ERROR_TYPES.get(kind, FlywheelError) if isinstance(kind, str) else FlywheelError
    retry_after = _seconds((headers or {}).get(RETRY_AFTER_KEY))
    return cls(
        str(message or f"HTTP {status}"), status=status, field=field, retry_after=retry_after
    )
