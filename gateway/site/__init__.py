"""The site gateway: the only component that touches rows (DESIGN §2).

:func:`build_site_server` starts one; :mod:`.pipeline` is the gRPC-free path a query travels,
:mod:`.service` the gRPC edge (identity, guarding, audit, metrics).
"""

from .service import RunningSite, SiteOptions, SiteService, SiteState, build_site_server

__all__ = ["RunningSite", "SiteOptions", "SiteService", "SiteState", "build_site_server"]
