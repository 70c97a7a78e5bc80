"""One error hierarchy for the whole gateway, its one status table, and its rich-status wire form.

Every error a caller can cause is a :class:`GatewayError` subclass that carries its data and a
message telling the caller what to do. On the wire it travels as a google.rpc rich status: the
gRPC code and message, an ``ErrorInfo`` (domain ``gateway``, reason = the class's ``reason_code``, the
fields as metadata) and, where one fits, a ``BadRequest`` or ``QuotaFailure``. The client rebuilds
the same class with its fields (:func:`error_from_rpc`), through a broker too. Match on the
class, never on message text.

A broken internal assumption is a :class:`GatewayBug`, outside the caller hierarchy: a caller
that catches :class:`GatewayError` handles its own mistakes and the network's state, not bugs.

Site, broker and client all read :data:`ERRORS` (class, status code, metrics outcome, reason).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from fractions import Fraction
from typing import ClassVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "gateway"
MAX_MESSAGE_BYTES = 1024
"""The most UTF-8 bytes of a message (or an ErrorInfo field) a status carries.

A status travels in trailing metadata, which a gRPC client accepts up to 8 KiB: the message
percent-encoded in ``grpc-message`` (a non-ASCII byte takes three), and again, with the fields,
base64-encoded in ``grpc-status-details-bin``. Only a message quoting what a caller sent can be
longer than this; sent whole, it would reach the caller as a transport RESOURCE_EXHAUSTED instead of
the error it is.
"""
_CUT = " [...] "


class GatewayError(Exception):
    """Root of every error the gateway reports to a caller."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    reason_code: ClassVar[str] = "GATEWAY_ERROR"  # stable, for ErrorInfo and for matching in other languages
    outcome: ClassVar[str] = "error"  # the gateway_queries_total outcome label
    caller_mistake: ClassVar[bool] = False  # the same at every site: a broker returns it as it is

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def fields(self) -> dict[str, str]:
        """The error's data as text (ErrorInfo metadata)."""
        return {}

    @property
    def short(self) -> str:
        """A short reason code, e.g. ``budget_exhausted`` or ``deadline`` (a broker's missing-site reason)."""
        return self.reason_code.lower()

    def extra_details(self) -> list[any_pb2.Any]:
        """google.rpc details beyond ErrorInfo (BadRequest, QuotaFailure) where one fits."""
        return []

    @classmethod
    def rebuild(cls, message: str, fields: Mapping[str, str]) -> GatewayError:
        """The error as the server raised it, from its message and :meth:`fields`."""
        return cls(message)

    def to_status(self) -> grpc.Status:
        """The rich status that carries this error to a caller, its texts :func:`bounded`."""
        metadata = {key: bounded(value) for key, value in self.fields().items()}
        info = error_details_pb2.ErrorInfo(reason=self.reason_code, domain=DOMAIN, metadata=metadata)
        details = [_pack(info), *self.extra_details()]
        return rpc_status.to_status(status_pb2.Status(code=self.code.value[0], message=bounded(self.message),
                                                      details=details))


def bounded(text: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """``text`` if its UTF-8 takes at most ``limit`` bytes; otherwise its start and its end around ``[...]``."""
    data = text.encode()
    if len(data) <= limit:
        return text
    keep = (limit - len(_CUT)) // 2
    return data[:keep].decode(errors="ignore") + _CUT + data[-keep:].decode(errors="ignore")


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


class InvalidQuery(GatewayError):
    """The request is malformed or asks for something the query language does not support."""

    code, reason_code, outcome, caller_mistake = grpc.StatusCode.INVALID_ARGUMENT, "INVALID_QUERY", "invalid", True

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field

    def fields(self) -> dict[str, str]:
        return {"field": self.field} if self.field else {}

    def extra_details(self) -> list[any_pb2.Any]:
        violation = error_details_pb2.BadRequest.FieldViolation(field=bounded(self.field),
                                                                description=bounded(self.message))
        return [_pack(error_details_pb2.BadRequest(field_violations=[violation]))]

    @classmethod
    def rebuild(cls, message: str, fields: Mapping[str, str]) -> GatewayError:
        return cls(message, fields.get("field", ""))


class NotFound(GatewayError):
    """A dataset or template that this site does not have."""

    code, reason_code, outcome, caller_mistake = grpc.StatusCode.NOT_FOUND, "NOT_FOUND", "invalid", True


class Unauthenticated(GatewayError):
    """Missing, malformed, expired or untrusted credentials (details only in the site's log)."""

    code, reason_code, outcome, caller_mistake = (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED",
                                             "unauthenticated", True)


class ProofRequired(Unauthenticated):
    """The token is valid and the caller holds its key, but the call lacks a proof for these servers.

    ``sites``: the names to sign proofs for (a site's own name; a broker's sites). A client signs
    them and calls again (:mod:`gateway.proof`).
    """

    reason_code, outcome = "PROOF_REQUIRED", "proof_required"  # a handshake, not an attack: its own label

    def __init__(self, sites: list[str], message: str = "") -> None:
        super().__init__(message or f"sign a proof of possession for each of: {', '.join(sites)}")
        self.sites = sites

    def fields(self) -> dict[str, str]:
        return {"sites": json.dumps(self.sites)}

    @classmethod
    def rebuild(cls, message: str, fields: Mapping[str, str]) -> GatewayError:
        sites = json.loads(fields["sites"])
        if not isinstance(sites, list) or not all(isinstance(s, str) for s in sites):
            raise ValueError("sites must be a list of names")
        return cls(sites, message)


class PermissionDenied(GatewayError):
    """Authenticated, but this identity may not do this."""

    code, reason_code, outcome, caller_mistake = grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED", "denied", True


class PolicyViolation(PermissionDenied):
    """The query is well formed but the site's policy does not allow it."""

    code, reason_code, outcome, caller_mistake = grpc.StatusCode.PERMISSION_DENIED, "POLICY_VIOLATION", "denied", True

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason

    def fields(self) -> dict[str, str]:
        return {"field": self.field, "reason": self.reason}

    @classmethod
    def rebuild(cls, message: str, fields: Mapping[str, str]) -> GatewayError:
        return cls(fields.get("field", ""), fields.get("reason", message))


class BudgetExhausted(GatewayError):
    """The query would spend more privacy budget than remains."""

    code, reason_code, outcome = grpc.StatusCode.RESOURCE_EXHAUSTED, "BUDGET_EXHAUSTED", "budget_exhausted"
    caller_mistake = True

    def __init__(self, dataset: str, requested: Fraction, remaining: Fraction | None,
                 resets_at: str = "", scope: str = "project") -> None:
        resets = f"; the budget resets at {resets_at}" if resets_at else "; this budget never resets"
        if remaining is None:  # a budget shared by all projects: what remains is not this caller's to know
            detail = f"requested epsilon {_fmt(requested)} is more than it has left"
        else:
            detail = (f"requested epsilon {_fmt(requested)}, remaining {_fmt(remaining)} "
                      f"(short by {_fmt(requested - remaining)})")
        super().__init__(f"privacy budget exhausted for {scope} on dataset {dataset!r}: {detail}{resets}. "
                         "Ask for a smaller epsilon or ask your privacy officer for more budget.")
        self.dataset = dataset
        self.requested = requested
        self.remaining = remaining
        self.resets_at = resets_at
        self.scope = scope

    def fields(self) -> dict[str, str]:
        fields = {"dataset": self.dataset, "requested": str(self.requested), "resets_at": self.resets_at,
                  "scope": self.scope}
        if self.remaining is not None:
            fields["remaining"] = str(self.remaining)
        return fields

    def extra_details(self) -> list[any_pb2.Any]:
        remaining = "undisclosed" if self.remaining is None else str(self.remaining)
        violation = error_details_pb2.QuotaFailure.Violation(
            subject=f"{self.scope}:{self.dataset}", description=f"requested epsilon {self.requested}, "
                                                                 f"remaining {remaining}")
        return [_pack(error_details_pb2.QuotaFailure(violations=[violation]))]

    @classmethod
    def rebuild(cls, message: str, fields: Mapping[str, str]) -> GatewayError:
        remaining = Fraction(fields["remaining"]) if "remaining" in fields else None
        err = cls(fields["dataset"], Fraction(fields["requested"]), remaining, fields.get("resets_at", ""),
                  fields.get("scope", "project"))
        err.message = message  # a broker prefixes the site's name
        err.args = (message,)
        return err


class QueryIdConflict(GatewayError):
    """A ``query_id`` was reused for a different query."""

    code, reason_code, outcome, caller_mistake = grpc.StatusCode.ALREADY_EXISTS, "QUERY_ID_CONFLICT", "invalid", True


class FailedPrecondition(GatewayError):
    """The site cannot serve the request in its current state (e.g. data unavailable)."""

    # its own outcome: a missing data file or a newer ledger is the operator's to fix, not a bug
    code, reason_code, outcome = grpc.StatusCode.FAILED_PRECONDITION, "FAILED_PRECONDITION", "failed_precondition"


class Unavailable(GatewayError):
    """A site or the broker could not be reached; retrying with the same query_id is safe."""

    # its own outcome: a disk that refuses the ledger or the audit log is an operator's alarm, not a bug
    code, reason_code, outcome = grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE", "unavailable"


class AuditUnavailable(Unavailable):
    """The site cannot write its audit log (disk full or failing), so it releases nothing.

    A site-side refinement of :class:`Unavailable` (it travels as UNAVAILABLE): ``recorded`` says
    the answer was charged and its audit record is kept, to be written when the disk allows, so
    the edge must not record the query a second time; a retry with the same query_id receives the
    answer at no further cost.
    """

    def __init__(self, message: str, recorded: bool = False) -> None:
        super().__init__(message)
        self.recorded = recorded


class DeadlineExceeded(GatewayError):
    """The call did not finish in time; retrying with the same query_id is safe."""

    # its own outcome: a caller's deadline or cancel is not one of the site's internal errors
    code, reason_code, outcome = grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE", "deadline"


class TransportError(GatewayError):
    """gRPC itself refused the call (e.g. a message over the size limit), not the gateway."""

    code, reason_code = grpc.StatusCode.UNKNOWN, "TRANSPORT"


class InvalidAnswer(GatewayError):
    """A site's answer failed the broker's checks (a fault or a bug at that site): it was not pooled.

    The broker lists the site as missing with this reason; the error itself never travels alone.
    """

    code, reason_code = grpc.StatusCode.FAILED_PRECONDITION, "INVALID_ANSWER"


class IncompleteAnswer(GatewayError):
    """The caller required every site (``require_all_sites``) and some did not answer.

    Raised by the client, never sent by a server. The sites that answered did charge for their
    answers: ``result`` holds the pooled answer anyway, and calling again with the same
    ``query_id`` pays nothing at those sites and asks the missing ones again. ``missing`` maps each
    missing site to why it is missing.
    """

    code, reason_code = grpc.StatusCode.FAILED_PRECONDITION, "INCOMPLETE_ANSWER"

    def __init__(self, message: str, missing: Mapping[str, str] | None = None, query_id: str = "",
                 result: object = None) -> None:
        super().__init__(message)
        self.missing, self.query_id, self.result = dict(missing or {}), query_id, result


class GatewayWarning(UserWarning):
    """Root of the warnings the client gives about an answer it returns (filter them by this class)."""


class MissingSitesWarning(GatewayWarning):
    """A pooled answer lacks some sites: it describes fewer patients than the network holds.

    ``missing`` maps each missing site to why (e.g. its budget ran out, or it was down).
    """

    def __init__(self, message: str, missing: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.missing = dict(missing or {})


class GatewayBug(Exception):
    """Root of "this is a bug" errors: a broken internal assumption, never the caller's doing."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InternalBug(GatewayBug):
    """An internal assumption broke in this process. This is a bug in the gateway, not in the request."""

    def __init__(self, message: str) -> None:
        super().__init__(f"internal error (this is a bug in the gateway, please report it): {message}")


class RemoteBug(GatewayBug):
    """A server reported an internal error (a bug there, not in the request); its message says what."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.INTERNAL) -> None:
        super().__init__(message)
        self.status = code  # INTERNAL or UNKNOWN


# The one status table: every caller-facing error class, with its code, reason and outcome.
ERRORS: tuple[type[GatewayError], ...] = (
    InvalidQuery, PolicyViolation, NotFound, Unauthenticated, ProofRequired, PermissionDenied, BudgetExhausted,
    QueryIdConflict, FailedPrecondition, Unavailable, DeadlineExceeded)
_BY_REASON: dict[str, type[GatewayError]] = {cls.reason_code: cls for cls in ERRORS}
# Without gateway details (from gRPC itself, or an older server) a code maps to its general class.
_BY_CODE: dict[grpc.StatusCode, type[GatewayError]] = {
    cls.code: cls for cls in ERRORS if cls not in (PolicyViolation, BudgetExhausted, ProofRequired)}
CALLER_MISTAKES: frozenset[grpc.StatusCode] = frozenset(cls.code for cls in ERRORS if cls.caller_mistake)
INTERNAL_MESSAGE = "internal error (this is a bug in the gateway; nothing was charged unless GetBudget says so)"


def outcome_of(code: grpc.StatusCode) -> str:
    """The metrics outcome label of a status code (``error`` for anything not a caller's doing)."""
    cls = _BY_CODE.get(code)
    return cls.outcome if cls is not None else "error"


def error_from_status(code: grpc.StatusCode, message: str, status: status_pb2.Status | None = None
                      ) -> GatewayError | GatewayBug:
    """The typed error a status stands for: rebuilt from its ErrorInfo when it has gateway details."""
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) and status is None:
        return RemoteBug(message, code)
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Is(info.DESCRIPTOR) and detail.Unpack(info) and info.domain == DOMAIN:
            cls = _BY_REASON.get(info.reason)
            if cls is not None:
                try:
                    return cls.rebuild(message, info.metadata)
                except (KeyError, ValueError, ZeroDivisionError):  # json errors are ValueErrors
                    break  # malformed details: fall back to the code
    cls = _BY_CODE.get(code)
    if cls is None:  # e.g. RESOURCE_EXHAUSTED from gRPC's own message size limit: not a budget refusal
        return TransportError(f"{code.name}: {message}")
    err = cls.__new__(cls)
    GatewayError.__init__(err, message)
    return err


def error_from_rpc(err: grpc.RpcError) -> GatewayError | GatewayBug:
    """The typed error a failed call raised (its rich status details included)."""
    code: grpc.StatusCode = err.code()
    message: str = err.details() or code.name
    try:
        status = rpc_status.from_call(err)
    except ValueError:  # inconsistent status: trust the code
        status = None
    return error_from_status(code, message, status)


def _fmt(value: Fraction) -> str:
    return f"{float(value):.6g}"
