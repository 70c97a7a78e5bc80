"""Serving: ``site serve`` and ``broker serve``, their token-key and lifecycle options, and shutdown."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import _logging
from ._cli_common import UserError
from ._version import __version__

DEFAULT_DRAIN_SECONDS = 5.0
log = logging.getLogger("gateway.cli")


def _site_serve(args: argparse.Namespace) -> int:
    from ._server import target_of
    from ._transport import Tls
    from .metrics import SiteMetrics, serve_metrics
    from .policy import PolicyFileError
    from .site import SiteOptions, build_site_server

    if bool(args.tls_cert) != bool(args.tls_key):
        raise UserError("--tls-cert and --tls-key go together")
    verifier = _verifier(args)
    tls = Tls(args.client_ca, args.tls_cert, args.tls_key) if args.tls_cert else None
    if args.state_dir is None:
        args.state_dir = Path("state")
        print(f"no --state-dir given: using {args.state_dir.resolve()}", file=sys.stderr, flush=True)
    options = SiteOptions(args.policy, args.state_dir, verifier, args.host, args.port, tls,
                          tuple(args.allow_peer), init=args.init)
    drain = _drain_seconds(args)
    metrics = SiteMetrics()
    try:
        site = build_site_server(options, metrics)
    except PolicyFileError as err:
        raise UserError("invalid policy:\n" + "\n".join(err.problems)) from None
    metrics_url = None
    if args.metrics_port is not None:
        bind = metrics_host(args.host, args.metrics_host)
        port = serve_metrics(args.metrics_port, metrics.registry, bind)
        metrics_url = f"http://{target_of(bind, port)}/metrics"
        print(f"metrics on {metrics_url}", flush=True)
    policy = site.state.live.loaded.policy
    print(f"site {policy.site} serving on {args.host}:{site.port}"
          + ("" if tls else " (PLAINTEXT, loopback development only)"), flush=True)
    _logging.event(log, "started", f"site {policy.site} serving on {target_of(args.host, site.port)}",
                   component="site", version=__version__, site=policy.site,
                   address=target_of(args.host, site.port), tls=tls is not None, mtls=bool(args.client_ca),
                   allowed_peers=list(args.allow_peer), datasets=sorted(policy.datasets),
                   populations=sorted(policy.populations()), budget_rules=len(policy.budgets),
                   policy=str(args.policy), state_dir=str(args.state_dir), metrics=metrics_url,
                   drain_seconds=drain, stop_grace=args.stop_grace)
    if args.port_file:
        args.port_file.write_text(str(site.port))
    _stop_on_signal("site", lambda: site.stop(args.stop_grace, drain), drain, args.stop_grace)
    return 0


def _lifecycle_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-format", choices=_logging.FORMATS, default=None,
                        help="json: one event per line; text: for a person (default: $GATEWAY_LOG_FORMAT, "
                             "else text on a terminal and json otherwise)")
    parser.add_argument("--drain-seconds", type=float, default=None, metavar="S",
                        help="on SIGTERM, report NOT_SERVING through gRPC health and keep serving this long "
                             "before stopping, so probes and load balancers move traffic away (default: 5, "
                             "0 on loopback)")
    parser.add_argument("--stop-grace", type=float, default=10.0, metavar="S",
                        help="then refuse new calls and give calls in flight this long to finish (default: 10)")


def _drain_seconds(args: argparse.Namespace) -> float:
    from ._server import is_loopback

    if args.drain_seconds is not None:
        if args.drain_seconds < 0 or args.stop_grace < 0:
            raise UserError("--drain-seconds and --stop-grace must be 0 or more")
        return float(args.drain_seconds)
    return 0.0 if is_loopback(args.host) else DEFAULT_DRAIN_SECONDS


def _token_key_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trusted-key", type=Path, action="append", default=[],
                        help="PEM public key trusted to sign tokens (repeatable)")
    parser.add_argument("--jwks", type=Path, default=None, help="JWKS file of trusted token keys")
    parser.add_argument("--jwks-url", default=None, metavar="URL",
                        help="your identity provider's JWKS URL (https): keys fetched at start, cached and "
                             "refreshed as they rotate")
    parser.add_argument("--issuer", default=None, help="expected token issuer (default: the development one)")
    parser.add_argument("--audience", default=None, help="expected token audience (default: the development one)")
    parser.add_argument("--max-token-lifetime", default="24h", metavar="DURATION",
                        help="refuse tokens valid for longer than this, exp - iat (e.g. 12h; default 24h)")


def _verifier(args: argparse.Namespace, required_claims: tuple[str, ...] | None = None) -> Any:
    """The token verifier a site or broker is started with (both check every call).

    ``required_claims``: other claims every token must carry than the default (sub, project, role).
    """
    import dataclasses

    from .auth import DEV_AUDIENCE, DEV_ISSUER, AuthConfig, Verifier, parse_ttl

    if not args.trusted_key and args.jwks is None and args.jwks_url is None:
        raise UserError("no token keys: pass --trusted-key PEM (repeatable), --jwks FILE or --jwks-url URL")
    try:
        max_lifetime = parse_ttl(args.max_token_lifetime)
    except ValueError as err:
        raise UserError(f"--max-token-lifetime: {err}") from None
    config = AuthConfig.from_files(args.trusted_key, args.jwks, args.issuer or DEV_ISSUER,
                                   args.audience or DEV_AUDIENCE, jwks_url=args.jwks_url, max_lifetime=max_lifetime)
    if required_claims is not None:
        config = dataclasses.replace(config, required_claims=required_claims)
    return Verifier(config)


def metrics_host(host: str, chosen: str | None) -> str:
    """Where /metrics listens: as chosen, else loopback for a loopback server, else the server's host.

    The metrics name every project and its spend: they never listen on all interfaces by default.
    """
    from ._server import is_loopback

    if chosen:
        return chosen
    if is_loopback(host):
        return "::1" if host.strip("[]") == "::1" else "127.0.0.1"
    return host


def _broker_serve(args: argparse.Namespace) -> int:
    from ._server import target_of
    from ._transport import Tls
    from .broker import build_broker_server, load_broker_config
    from .metrics import BrokerMetrics, serve_metrics

    if bool(args.tls_cert) != bool(args.tls_key):
        raise UserError("--tls-cert and --tls-key go together")
    config = load_broker_config(args.config)
    verifier = _verifier(args)  # flag mistakes are found before anything starts
    drain = _drain_seconds(args)
    metrics = BrokerMetrics()
    tls = Tls(cert=args.tls_cert, key=args.tls_key) if args.tls_cert else None
    broker = build_broker_server(config, verifier, args.host, args.port, tls, metrics)
    metrics_url = None
    if args.metrics_port is not None:
        bind = metrics_host(args.host, args.metrics_host)
        port = serve_metrics(args.metrics_port, metrics.registry, bind)
        metrics_url = f"http://{target_of(bind, port)}/metrics"
        print(f"metrics on {metrics_url}", flush=True)
    print(f"broker {config.name} serving on {args.host}:{broker.port} for {len(config.sites)} site(s)", flush=True)
    _logging.event(log, "started", f"broker {config.name} serving on {target_of(args.host, broker.port)}",
                   component="broker", version=__version__, broker=config.name,
                   address=target_of(args.host, broker.port), tls=tls is not None,
                   sites={s.name: s.address for s in config.sites}, min_sites=config.min_sites,
                   deadline_seconds=config.deadline_seconds, metrics=metrics_url, drain_seconds=drain,
                   stop_grace=args.stop_grace)
    if args.port_file:
        args.port_file.write_text(str(broker.port))
    _stop_on_signal("broker", lambda: broker.stop(args.stop_grace, drain), drain, args.stop_grace)
    return 0


def _stop_on_signal(component: str, stop: Callable[[], None], drain: float, grace: float) -> None:
    """Wait for SIGTERM or SIGINT, then ``stop`` (health NOT_SERVING, drain, grace), saying so in the log."""
    received: list[int] = []
    done = threading.Event()

    def note(signum: int, _frame: object) -> None:
        received.append(signum)
        done.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, note)
    while not done.wait(1.0):
        pass
    name = signal.Signals(received[0]).name
    _logging.event(log, "stopping", f"{component} stopping on {name}: health NOT_SERVING, serving {drain:g} s "
                   f"more, then {grace:g} s for calls in flight", component=component, signal=name,
                   drain_seconds=drain, stop_grace=grace)
    started = time.monotonic()
    stop()
    _logging.event(log, "stopped", f"{component} stopped", component=component,
                   seconds=round(time.monotonic() - started, 3))
