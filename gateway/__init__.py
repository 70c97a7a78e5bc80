"""Privacy-preserving federated query gateway for cancer research networks.

Public surface: :class:`gateway.client.Client` for researchers, the error hierarchy in
:mod:`gateway.errors`, policy loading in :mod:`gateway.policy`, and the servers in
:mod:`gateway.site`. See the README for the first five minutes.
"""

from ._version import __version__
from .errors import BudgetExhausted, GatewayError, InvalidQuery, NotFound, PermissionDenied, Unauthenticated

__all__ = ["BudgetExhausted", "GatewayError", "InvalidQuery", "NotFound", "PermissionDenied", "Unauthenticated",
           "__version__"]
