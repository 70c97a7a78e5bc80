"""gRPC server plumbing shared by site and broker: health, reflection, TLS/mTLS, the loopback rule."""

from __future__ import annotations

import ipaddress
import logging
import time
from concurrent import futures
from typing import NamedTuple

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ._proto.gateway.v1 import gateway_pb2 as pb
from ._proto.gateway.v1 import gateway_pb2_grpc as pb_grpc
from ._transport import Tls, server_credentials

log = logging.getLogger("gateway.server")
SERVICE = pb.DESCRIPTOR.services_by_name["Gateway"].full_name


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def target_of(host: str, port: int) -> str:
    """Where clients reach a server bound to ``host:port`` (an IPv6 host in brackets)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class Serving(NamedTuple):
    """A started server: the gRPC server, its bound port, its health servicer and its worker threads.

    Stopping a gRPC server leaves its worker threads alive: whoever stops it shuts ``workers`` down.
    """

    server: grpc.Server
    port: int
    health: health.HealthServicer
    workers: futures.ThreadPoolExecutor


def make_server(servicer: pb_grpc.GatewayServicer, host: str, port: int, tls: Tls | None,
                max_workers: int = 16) -> Serving:
    """A started gRPC server serving ``servicer`` with health checking and reflection.

    Plaintext is refused on non-loopback hosts.
    """
    if tls is None and not is_loopback(host):
        raise ValueError(f"refusing plaintext on {host}: give --tls-cert/--tls-key (plaintext is for loopback only)")
    # named for the servicer, so that a thread dump tells which server a worker belongs to
    workers = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=type(servicer).__name__)
    server = grpc.server(workers, options=[("grpc.max_receive_message_length", 4 * 1024 * 1024)])
    pb_grpc.add_GatewayServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = target_of(host, port)
    if tls is None:
        bound = server.add_insecure_port(address)
        log.warning("serving PLAINTEXT on %s:%s (loopback development only)", host, bound)
    else:
        bound = server.add_secure_port(address, server_credentials(tls))
    if bound == 0:
        raise OSError(f"cannot bind {address}")
    server.start()
    for name in ("", SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return Serving(server, bound, health_servicer, workers)


def drain_then_stop(server: grpc.Server, health_servicer: health.HealthServicer | None, drain: float,
                    grace: float) -> None:
    """Health NOT_SERVING at once, keep serving ``drain`` seconds, then stop with ``grace`` for calls in flight.

    gRPC health watchers and probes see NOT_SERVING while every call still succeeds, so traffic
    moves away before any call is refused.
    """
    if health_servicer is not None:
        health_servicer.enter_graceful_shutdown()  # every service NOT_SERVING, and it stays so
    if drain > 0:
        time.sleep(drain)
    server.stop(grace).wait()
