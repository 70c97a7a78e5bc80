"""Serving: ``site serve`` and ``broker serve``, their settings (flags, environment, config file) and shutdown."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import _logging
from ._cli_common import UserError, check_files
from ._version import __version__

DEFAULT_DRAIN_SECONDS = 5.0
log = logging.getLogger("gateway.cli")


_SET = argparse.SUPPRESS  # a setting's flag absent: the environment, the config file or the default decides


def add_site_serve(site: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``gateway site serve``: every setting a flag too (docs/server-config.md)."""
    serve = site.add_parser("serve", help="serve a site gateway",
                            description="Serve a site gateway. Each setting comes from its flag, else its "
                                        "GATEWAY_SITE_* variable, else the --config file, else its default "
                                        "(docs/server-config.md).")
    serve.add_argument("--config", type=Path, default=None,
                       help="a site config file (YAML; default: $GATEWAY_SITE_CONFIG, else none)")
    serve.add_argument("--policy", type=Path, default=_SET,
                       help="the site's policy file (reloaded when it changes); required here, in "
                            "$GATEWAY_SITE_POLICY or in the config file")
    _address_args(serve, "site", 50051)
    serve.add_argument("--state-dir", type=Path, default=_SET,
                       help="ledger, audit log and snapshots (default: ./state, said at start)")
    serve.add_argument("--init", action="store_true",
                       help="begin a new ledger although the state dir's audit log has a history")
    _token_key_args(serve)
    _tls_args(serve)
    serve.add_argument("--client-ca", type=Path, default=_SET,
                       help="require client certificates signed by this CA (mTLS)")
    serve.add_argument("--allow-peer", dest="allow_peers", action="append", default=_SET,
                       help="accept only clients whose certificate CN is this (repeatable; needs --client-ca)")
    serve.add_argument("--engine-memory-limit", default=_SET,
                       help="the most memory DuckDB may use, e.g. 4GB (default: DuckDB's, 80%% of the machine's)")
    serve.add_argument("--engine-threads", type=int, default=_SET,
                       help="threads DuckDB may use (default: one per core)")
    _lifecycle_args(serve)
    serve.set_defaults(run=_site_serve, serves=True)


def add_broker_serve(broker: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``gateway broker serve``: the sites come from the config file; the rest may be flags too."""
    serve = broker.add_parser("serve", help="serve a broker in front of the sites in a config file",
                              description="Serve a broker. Its sites come from the config file; every other "
                                          "setting from its flag, else its GATEWAY_BROKER_* variable, else the "
                                          "config file, else its default (docs/server-config.md).")
    serve.add_argument("--config", type=Path, default=None,
                       help="the broker config file (its sites; see gateway broker check); default: "
                            "$GATEWAY_BROKER_CONFIG")
    _address_args(serve, "broker", 50050)
    _token_key_args(serve)
    _tls_args(serve)
    _lifecycle_args(serve)
    serve.set_defaults(run=_broker_serve, serves=True)


def _address_args(parser: argparse.ArgumentParser, what: str, port: int) -> None:
    parser.add_argument("--host", default=_SET, help="address to serve on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=_SET,
                        help=f"port to serve on; 0: any free port (default: {port})")
    parser.add_argument("--metrics-port", type=int, default=_SET,
                        help="serve Prometheus /metrics on this port (default: none)")
    parser.add_argument("--metrics-host", default=_SET,
                        help=f"where /metrics listens (default: loopback for a loopback {what}, else --host)")
    parser.add_argument("--port-file", type=Path, default=_SET, help="write the bound port here once serving")


def _tls_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-cert", type=Path, default=_SET,
                        help="server certificate (PEM) for TLS; plaintext only on loopback")
    parser.add_argument("--tls-key", type=Path, default=_SET, help="the server certificate's private key (PEM file)")


def _settings_of(args: argparse.Namespace, component: str) -> Any:
    """The server's settings from its flags, the environment and its config file; a mistake is a UserError."""
    from ._yamlfile import ConfigFileError
    from .broker.config import ENV_PREFIX as BROKER
    from .broker.config import BrokerConfig, load_broker_settings
    from .site.settings import ENV_PREFIX as SITE
    from .site.settings import SiteSettings, load_site_settings

    prefix, model = (SITE, SiteSettings) if component == "site" else (BROKER, BrokerConfig)
    config = args.config or (Path(os.environ[prefix + "CONFIG"]) if os.environ.get(prefix + "CONFIG") else None)
    flags = {name: value for name, value in vars(args).items() if name in model.model_fields}
    try:
        if component == "site":
            return load_site_settings(config, os.environ, flags)
        if config is None:
            raise UserError(f"no broker config: pass --config FILE or set {prefix}CONFIG (the file names the sites)")
        return load_broker_settings(config, os.environ, flags)
    except ConfigFileError as err:
        sep = "\n" if len(err.problems) > 1 else " "
        raise UserError(f"invalid {err.noun}:{sep}" + "\n".join(err.problems)) from None


def _site_check_config(args: argparse.Namespace) -> int:
    from .site.settings import SiteConfigError, load_site_settings_file

    return check_files(args.files, load_site_settings_file, SiteConfigError,
                       lambda settings: f"policy {settings.policy}")


def _site_serve(args: argparse.Namespace) -> int:
    from ._server import target_of
    from ._transport import Tls
    from .metrics import SiteMetrics, serve_metrics
    from .policy import PolicyFileError
    from .site import SiteOptions, build_site_server

    settings = _settings_of(args, "site")
    verifier = _verifier(settings)
    tls = Tls(settings.client_ca, settings.tls_cert, settings.tls_key) if settings.tls_cert else None
    state_dir = settings.state_dir
    if state_dir is None:
        state_dir = Path("state")
        print(f"no state dir given (--state-dir): using {state_dir.resolve()}", file=sys.stderr, flush=True)
    options = SiteOptions(settings.policy, state_dir, verifier, settings.host, settings.port, tls,
                          settings.allow_peers, init=args.init, engine_limits=settings.engine_limits())
    drain = _drain_seconds(settings)
    metrics = SiteMetrics()
    try:
        site = build_site_server(options, metrics)
    except PolicyFileError as err:
        raise UserError("invalid policy:\n" + "\n".join(err.problems)) from None
    metrics_url = _serve_metrics(settings, metrics.registry, serve_metrics, target_of)
    policy = site.state.live.loaded.policy
    host = settings.host
    print(f"site {policy.site} serving on {host}:{site.port}"
          + ("" if tls else " (PLAINTEXT, loopback development only)"), flush=True)
    _logging.event(log, "started", f"site {policy.site} serving on {target_of(host, site.port)}",
                   component="site", version=__version__, site=policy.site,
                   address=target_of(host, site.port), tls=tls is not None, mtls=bool(settings.client_ca),
                   allowed_peers=list(settings.allow_peers), datasets=sorted(policy.datasets),
                   populations=sorted(policy.populations()), budget_rules=len(policy.budgets),
                   policy=str(settings.policy), state_dir=str(state_dir), metrics=metrics_url,
                   config=str(args.config) if args.config else None, drain_seconds=drain,
                   stop_grace=settings.stop_grace, engine=options.engine_limits.describe())
    if settings.port_file:
        settings.port_file.write_text(str(site.port))
    _stop_on_signal("site", lambda: site.stop(settings.stop_grace, drain), drain, settings.stop_grace)
    return 0


def _serve_metrics(settings: Any, registry: Any, serve: Callable[..., int], target_of: Callable[[str, int], str]
                   ) -> str | None:
    """Start /metrics if a port is set; its URL (printed too), or None."""
    if settings.metrics_port is None:
        return None
    bind = metrics_host(settings.host, settings.metrics_host)
    port = serve(settings.metrics_port, registry, bind)
    url = f"http://{target_of(bind, port)}/metrics"
    print(f"metrics on {url}", flush=True)
    return url


def _lifecycle_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-format", choices=_logging.FORMATS, default=None,
                        help="json: one event per line; text: for a person (default: $GATEWAY_LOG_FORMAT, "
                             "else text on a terminal and json otherwise)")
    parser.add_argument("--drain-seconds", type=float, default=_SET, metavar="S",
                        help="on SIGTERM, report NOT_SERVING through gRPC health and keep serving this long "
                             "before stopping, so probes and load balancers move traffic away (default: 5, "
                             "0 on loopback)")
    parser.add_argument("--stop-grace", type=float, default=_SET, metavar="S",
                        help="then refuse new calls and give calls in flight this long to finish (default: 10)")


def _drain_seconds(settings: Any) -> float:
    from ._server import is_loopback

    if settings.drain_seconds is not None:
        return float(settings.drain_seconds)
    return 0.0 if is_loopback(settings.host) else DEFAULT_DRAIN_SECONDS


def _token_key_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trusted-key", dest="trusted_keys", type=Path, action="append", default=_SET,
                        help="PEM public key trusted to sign tokens (repeatable)")
    parser.add_argument("--jwks", type=Path, default=_SET, help="JWKS file of trusted token keys")
    parser.add_argument("--jwks-url", default=_SET, metavar="URL",
                        help="your identity provider's JWKS URL (https): keys fetched at start, cached and "
                             "refreshed as they rotate")
    parser.add_argument("--issuer", default=_SET, help="expected token issuer (default: the development one)")
    parser.add_argument("--audience", default=_SET, help="expected token audience (default: the development one)")
    parser.add_argument("--max-token-lifetime", default=_SET, metavar="DURATION",
                        help="refuse tokens valid for longer than this, exp - iat (e.g. 12h; default 24h)")


def _verifier(settings: Any, required_claims: tuple[str, ...] | None = None) -> Any:
    """The token verifier a site, broker or console is started with (all check every call); settings are checked.

    ``required_claims``: other claims every token must carry than the default (sub, project, role).
    """
    import dataclasses

    from .auth import DEV_AUDIENCE, DEV_ISSUER, AuthConfig, Verifier, parse_ttl

    config = AuthConfig.from_files(list(settings.trusted_keys), settings.jwks, settings.issuer or DEV_ISSUER,
                                   settings.audience or DEV_AUDIENCE, jwks_url=settings.jwks_url,
                                   max_lifetime=parse_ttl(settings.max_token_lifetime))
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
    from .broker import build_broker_server
    from .metrics import BrokerMetrics, serve_metrics

    config = _settings_of(args, "broker")
    verifier = _verifier(config)
    drain = _drain_seconds(config)
    metrics = BrokerMetrics()
    tls = Tls(cert=config.tls_cert, key=config.tls_key) if config.tls_cert else None
    broker = build_broker_server(config, verifier, config.host, config.port, tls, metrics)
    metrics_url = _serve_metrics(config, metrics.registry, serve_metrics, target_of)
    address = target_of(config.host, broker.port)
    print(f"broker {config.name} serving on {config.host}:{broker.port} for {len(config.sites)} site(s)", flush=True)
    _logging.event(log, "started", f"broker {config.name} serving on {address}",
                   component="broker", version=__version__, broker=config.name, address=address, tls=tls is not None,
                   sites={s.name: s.address for s in config.sites}, min_sites=config.min_sites,
                   deadline_seconds=config.deadline_seconds, metrics=metrics_url, drain_seconds=drain,
                   stop_grace=config.stop_grace)
    if config.port_file:
        config.port_file.write_text(str(broker.port))
    _stop_on_signal("broker", lambda: broker.stop(config.stop_grace, drain), drain, config.stop_grace)
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
