"""The broker: one gateway.v1 endpoint in front of every site (DESIGN §2).

:mod:`.config` reads its configuration file, :mod:`.pooling` combines the sites' noisy answers
(pure functions), :mod:`.service` fans calls out over gRPC.
"""

from .config import BrokerConfig, SiteEntry, load_broker_config
from .service import BrokerService, RunningBroker, build_broker_server

__all__ = ["BrokerConfig", "BrokerService", "RunningBroker", "SiteEntry", "build_broker_server", "load_broker_config"]
