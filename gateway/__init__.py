"""Privacy-preserving federated query gateway for cancer research networks.

Public surface: :class:`gateway.client.Client` for researchers, the error hierarchy in
:mod:`gateway.errors`, policy loading in :mod:`gateway.policy`, the table of aggregate kinds in
:mod:`gateway.aggregates`, and the servers in :mod:`gateway.site` and :mod:`gateway.broker`. See
the README for the first five minutes.
"""

from ._version import __version__
from .errors import (
    BudgetExhausted,
    GatewayBug,
    GatewayError,
    InvalidQuery,
    NotFound,
    PermissionDenied,
    PolicyViolation,
    Unauthenticated,
    Unavailable,
)

__all__ = ["BudgetExhausted", "GatewayBug", "GatewayError", "InvalidQuery", "NotFound", "PermissionDenied",
           "PolicyViolation", "Unauthenticated", "Unavailable", "__version__"]
