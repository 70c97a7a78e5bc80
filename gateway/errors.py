"""One error hierarchy for the whole gateway, and its mapping to gRPC status codes.

Every error a caller can cause is a :class:`GatewayError` subclass that carries its data and
a message telling the caller what to do. :data:`STATUS_OF` is the one table from error class to
gRPC status; the client maps a status back to the same class with :func:`error_from_status`.
Match on the class (or ``code``), never on message text.
"""

from __future__ import annotations

from fractions import Fraction

import grpc


class GatewayError(Exception):
    """Root of every error the gateway reports to a caller."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidQuery(GatewayError):
    """The request is malformed or asks for something the query language does not support."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class PolicyViolation(GatewayError):
    """The query is well formed but the site's policy does not allow it."""

    code = grpc.StatusCode.PERMISSION_DENIED

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class NotFound(GatewayError):
    """A dataset or template that this site does not have."""

    code = grpc.StatusCode.NOT_FOUND


class Unauthenticated(GatewayError):
    """Missing, malformed, expired or untrusted credentials (details only in the site's log)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(GatewayError):
    """Authenticated, but this identity may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class BudgetExhausted(GatewayError):
    """The query would spend more privacy budget than remains."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, dataset: str, requested: Fraction, remaining: Fraction,
                 resets_at: str = "", scope: str = "project") -> None:
        resets = f"; the budget resets at {resets_at}" if resets_at else "; this budget never resets"
        super().__init__(
            f"privacy budget exhausted for {scope} on dataset {dataset!r}: requested epsilon "
            f"{_fmt(requested)}, remaining {_fmt(remaining)} (short by {_fmt(requested - remaining)})"
            f"{resets}. Ask for a smaller epsilon or ask your privacy officer for more budget.")
        self.dataset = dataset
        self.requested = requested
        self.remaining = remaining
        self.resets_at = resets_at


class QueryIdConflict(GatewayError):
    """A ``query_id`` was reused for a different query."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(GatewayError):
    """The site cannot serve the request in its current state (e.g. data unavailable)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(GatewayError):
    """A site or the broker could not be reached; retrying with the same query_id is safe."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(GatewayError):
    """The call did not finish in time; retrying with the same query_id is safe."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class InternalBug(GatewayError):
    """An internal assumption broke. This is a bug in the gateway, not in the request."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(f"internal error (this is a bug in the gateway, please report it): {message}")


STATUS_OF: dict[type[GatewayError], grpc.StatusCode] = {
    cls: cls.code
    for cls in (InvalidQuery, PolicyViolation, NotFound, Unauthenticated, PermissionDenied,
                BudgetExhausted, QueryIdConflict, FailedPrecondition, Unavailable,
                DeadlineExceeded, InternalBug)
}

# Status -> the class the client raises. PERMISSION_DENIED maps to the general class.
_CLASS_OF: dict[grpc.StatusCode, type[GatewayError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidQuery,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: GatewayError,
    grpc.StatusCode.ALREADY_EXISTS: QueryIdConflict,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.INTERNAL: GatewayError,
}


class RemoteBudgetExhausted(GatewayError):
    """Client side of :class:`BudgetExhausted`: the server's message, without the numbers parsed."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


_CLASS_OF[grpc.StatusCode.RESOURCE_EXHAUSTED] = RemoteBudgetExhausted


def error_from_status(code: grpc.StatusCode, message: str) -> GatewayError:
    """Turn a gRPC status received by a client back into the matching typed error."""
    cls = _CLASS_OF.get(code, GatewayError)
    err = GatewayError.__new__(cls)
    GatewayError.__init__(err, message)
    err.code = code
    return err


def _fmt(value: Fraction) -> str:
    return f"{float(value):.6g}"
