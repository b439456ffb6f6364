"""Typed domain errors. Each transport maps them to status codes in exactly one place."""

from __future__ import annotations


class FlywheelError(Exception):
    """Base class; `field` names the offending request field when there is one, `key` the API
    key a refusal is about (metrics and the audit trail count refusals by it)."""

    def __init__(self, message: str, *, field: str | None = None, key: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.key = key


class InvalidRequest(FlywheelError):
    """Bad input: INVALID_ARGUMENT / 400."""


class NotFound(FlywheelError):
    """An id the server does not know: NOT_FOUND / 404."""


class AdapterNotFound(NotFound):
    """A policy or reward version that is not loaded."""


class Conflict(FlywheelError):
    """The request is valid but the current state refuses it: FAILED_PRECONDITION / 409."""


class AdapterRefused(Conflict):
    """An adapter failed its checks (checksum, base model, rank, finite logits)."""


class Overloaded(FlywheelError):
    """The queue is full: RESOURCE_EXHAUSTED / 429. `retry_after`: seconds after which a retry
    may be served (HTTP's Retry-After, gRPC's `retry-after` trailing metadata)."""

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        key: str | None = None,
        retry_after: float = 1.0,
    ) -> None:
        super().__init__(message, field=field, key=key)
        self.retry_after = retry_after


class RateLimited(Overloaded):
    """An API key is over its own request rate (`limits`); the server may be idle."""


class Unavailable(FlywheelError):
    """A backend the server depends on (the vLLM sidecar) is down: UNAVAILABLE / 503."""


class StalledClient(FlywheelError):
    """The client read nothing of a streamed answer for the write timeout: DEADLINE_EXCEEDED
    (an HTTP connection in that state is aborted instead, `write_timeout`)."""


class Unauthenticated(FlywheelError):
    """Missing or unknown API key: UNAUTHENTICATED / 401."""


class PermissionDenied(FlywheelError):
    """The key lacks the scope: PERMISSION_DENIED / 403."""
