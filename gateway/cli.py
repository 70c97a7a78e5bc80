"""The ``gateway`` command line (DESIGN §11). User mistakes print one line to stderr and exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from . import _logging
from ._cli_common import EXIT_USAGE, UserError
from ._cli_officer import (
    _audit_tail,
    _audit_verify,
    _broker_check,
    _policy_check,
    _policy_diff,
    _policy_explain,
    _policy_init,
    _policy_schema,
    console_parser,
)
from ._cli_serve import _site_check_config, add_broker_serve, add_site_serve, metrics_host
from ._version import __version__
from .errors import GatewayError

__all__ = ["EXIT_USAGE", "UserError", "main", "metrics_host"]

log = logging.getLogger("gateway.cli")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gateway`` command."""
    parser = _parser()
    args = parser.parse_args(argv)
    serving = getattr(args, "serves", False)
    try:
        # a server's events go to a collector as JSON by default; a one-shot command talks to a person
        _logging.configure(_logging.log_format(getattr(args, "log_format", None), os.environ,
                                               interactive=sys.stderr.isatty() or not serving),
                           _logging.log_level(os.environ, "INFO" if serving else "WARNING"), sys.stderr)
    except ValueError as err:
        print(f"gateway: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.run(args) or 0)
    except (UserError, GatewayError, OSError, ValueError) as err:
        message = err.message if isinstance(err, GatewayError) else str(err)
        print(f"gateway: error: {message}", file=sys.stderr)
        return 1 if isinstance(err, GatewayError) else EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="Privacy-preserving federated query gateway.")
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="run the embedded demo network with example questions")
    demo.add_argument("--sites", type=int, default=4, help="number of sites (1-4; default 4)")
    demo.add_argument("--patients", type=int, default=20_000, help="patients per site (default 20000)")
    demo.add_argument("--keep-running", action="store_true", help="leave the network up and print how to query it")
    demo.add_argument("--tls", action="store_true",
                      help="run over TLS on DEVELOPMENT certificates: the sites require the broker's client "
                           "certificate (mTLS)")
    demo.set_defaults(run=_demo)

    data = sub.add_parser("data", help="synthetic data").add_subparsers(required=True, metavar="ACTION")
    synth = data.add_parser("synth", help="write a synthetic cancer registry for one site to DuckDB")
    synth.add_argument("--site", required=True,
                       help="the site's name (its registry's profile: north, south, east, west or any)")
    synth.add_argument("--patients", type=int, required=True, help="how many patients")
    synth.add_argument("--seed", type=int, default=0,
                       help="random seed: the same seed writes the same data (default: 0)")
    synth.add_argument("--out", type=Path, required=True, help="the DuckDB file to write (tables patients, treatments)")
    synth.set_defaults(run=_synth)

    site = sub.add_parser("site", help="site gateway").add_subparsers(required=True, metavar="ACTION")
    add_site_serve(site)
    scheck = site.add_parser("check-config", help="validate site config files (file:line: field: reason)")
    scheck.add_argument("files", type=Path, nargs="+", help="site config files (see docs/server-config.md)")
    scheck.set_defaults(run=_site_check_config)

    broker = sub.add_parser("broker", help="broker").add_subparsers(required=True, metavar="ACTION")
    bcheck = broker.add_parser("check", help="validate broker config files (file:line: field: reason)")
    bcheck.add_argument("files", type=Path, nargs="+", help="broker config files")
    bcheck.set_defaults(run=_broker_check)
    add_broker_serve(broker)

    token = sub.add_parser("token", help="development tokens").add_subparsers(required=True, metavar="ACTION")
    keygen = token.add_parser("keygen", help="write a DEVELOPMENT signing key pair")
    keygen.add_argument("--out", type=Path, required=True, help="folder to write the key pair to")
    keygen.set_defaults(run=_keygen)
    mint = token.add_parser("mint", help="sign a DEVELOPMENT token")
    mint.add_argument("--key", type=Path, required=True, help="the DEVELOPMENT signing key (from token keygen)")
    mint.add_argument("--subject", required=True, help="who the token is for (sub claim)")
    mint.add_argument("--project", required=True, help="the project whose budget the token spends")
    mint.add_argument("--role", default="researcher", help="the role claim (default: researcher)")
    mint.add_argument("--ttl", default="1h", help="lifetime, e.g. 15m, 1h, 7d (default: 1h)")
    mint.add_argument("--issuer", default=None, help="iss claim (default: the development issuer)")
    mint.add_argument("--audience", default=None, help="aud claim (default: the development audience)")
    mint.add_argument("--proof-key", type=Path, default=None, metavar="FILE",
                      help="the caller's proof key the token is bound to, created (0600) if missing "
                           "(default: $GATEWAY_PROOF_KEY)")
    mint.set_defaults(run=_mint)

    query = sub.add_parser("query", help="run a query against a site or broker")
    _target_args(query)
    body = query.add_mutually_exclusive_group(required=True)
    body.add_argument("--sql", help="one supported SELECT (see the README's 'What a query may be')")
    body.add_argument("--template", help="an approved template's name (with --param)")
    query.add_argument("--param", action="append", default=[], metavar="K=V", help="template parameter")
    query.add_argument("--epsilon", type=float, default=0.0,
                       help="privacy loss to spend; 0: the policy's default (default: 0)")
    query.add_argument("--dry-run", action="store_true",
                       help="price the query and predict its accuracy; nothing is charged")
    query.add_argument("--query-id", default=None,
                       help="idempotency key: a retry with the same id never pays twice (default: a new one)")
    query.add_argument("--site", action="append", default=[], help="broker only: ask this site (repeatable)")
    query.add_argument("--single-site", action="store_true",
                       help="site only: medians and quantiles by OpenDP's quantile mechanism (more accurate at one "
                            "site for small epsilon; no interval; a broker refuses it)")
    query.add_argument("--require-all-sites", action="store_true",
                       help="broker only: fail (exit 1) when any site is missing from the answer, instead of warning")
    query.add_argument("--json", action="store_true", help="print the answer as JSON")
    query.set_defaults(run=_query)

    datasets = sub.add_parser("datasets", help="the datasets you may query: columns, roles, bounds, costs, sites")
    _target_args(datasets)
    datasets.add_argument("--json", action="store_true", help="print them as JSON")
    datasets.set_defaults(run=_datasets)

    budget = sub.add_parser("budget", help="show your project's privacy budget")
    _target_args(budget)
    budget.add_argument("--dataset", default="", help="only this dataset's population (default: all you may use)")
    budget.add_argument("--json", action="store_true", help="print the budgets as JSON")
    budget.set_defaults(run=_budget)

    status = sub.add_parser("status", help="who serves at which version; from a broker, each site's health, "
                                           "version and last error (exit 1 when a site is not serving)")
    _target_args(status)
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(run=_status)

    history = sub.add_parser("history", help="your project's past answers, newest first, with what each cost")
    _target_args(history)
    history.add_argument("--limit", type=int, default=20, help="at most this many per site (default: 20)")
    history.add_argument("--json", action="store_true", help="the entries and their answers as JSON")
    history.set_defaults(run=_history)

    mcp = sub.add_parser("mcp", help="serve tools for LLM analysis agents over stdio (Model Context Protocol)",
                         description="Serve the Model Context Protocol over stdin/stdout: tools to list datasets, "
                                     "price, run, read the budget and the history, under your own token. Needs "
                                     "the mcp extra: pip install 'gateway[mcp]'.")
    _target_args(mcp)
    mcp.add_argument("--max-epsilon-per-session", type=float, default=None, metavar="EPSILON",
                     help="the most epsilon this run may spend, over all queries (default: only the budget limits it)")
    mcp.set_defaults(run=_mcp)

    policy = sub.add_parser("policy", help="policy files").add_subparsers(required=True, metavar="ACTION")
    check = policy.add_parser("check", help="validate policy files (every error, then warnings, in line order)")
    check.add_argument("files", type=Path, nargs="+", help="policy files")
    check.add_argument("--strict", action="store_true", help="fail on warnings too")
    check.add_argument("--data", action="store_true",
                       help="also read each dataset's source: tables and columns exist with the declared types")
    check.add_argument("--state-dir", type=Path, default=None, metavar="DIR",
                       help="a site's state dir: warn where a budget would be below what is already spent")
    check.set_defaults(run=_policy_check)
    explain = policy.add_parser("explain", help="what a project may do under a policy")
    explain.add_argument("file", type=Path, help="the policy file")
    explain.add_argument("--project", required=True, help="the project to explain")
    explain.add_argument("--role", default="researcher", help="the caller's role (default: researcher)")
    explain.set_defaults(run=_policy_explain)
    diff = policy.add_parser("diff", help="what changes between two policy files")
    diff.add_argument("old", type=Path, help="the policy in force")
    diff.add_argument("new", type=Path, help="the edited policy")
    diff.set_defaults(run=_policy_diff)
    init = policy.add_parser("init", help="write a commented policy skeleton from a table's schema (no values read)")
    init.add_argument("--source", type=Path, required=True, help="a DuckDB file, or parquet file(s)")
    init.add_argument("--table", default=None, help="the table or view in a DuckDB file")
    init.add_argument("--out", type=Path, default=None, help="write here (default: print); refuses to overwrite")
    init.set_defaults(run=_policy_init)
    schema = policy.add_parser("schema", help="print the JSON Schema of policy files (reference: docs/policy.md)")
    schema.set_defaults(run=_policy_schema)

    certs = sub.add_parser("certs", help="DEVELOPMENT certificates").add_subparsers(required=True, metavar="ACTION")
    devcerts = certs.add_parser("dev", help="write a DEVELOPMENT-ONLY CA and certificates for the sites and broker",
                                description="Write a DEVELOPMENT-ONLY CA certificate and, for each site and the "
                                            "broker, a certificate (common name and DNS name: the name given; also "
                                            "localhost and 127.0.0.1) and its key (0600). Not for production.")
    devcerts.add_argument("--out", type=Path, required=True, help="folder to write to (existing files are kept: "
                                                                  "the command refuses to replace them)")
    devcerts.add_argument("--sites", default="north,south,east,west", metavar="NAME,...",
                          help="site host names (default: north,south,east,west)")
    devcerts.add_argument("--broker", default="broker", metavar="NAME",
                          help="the broker's name: its certificate's common name, for the sites' --allow-peer "
                               "(default: broker)")
    devcerts.add_argument("--days", type=int, default=90, help="validity in days (default 90)")
    devcerts.set_defaults(run=_certs_dev)

    health = sub.add_parser("health", help="ask a site's or broker's gRPC health service; exit 0 when serving",
                            description="One gRPC health check (grpc.health.v1), as container health checks and "
                                        "probes run it. Flags default to $GATEWAY_HEALTH_TARGET, "
                                        "$GATEWAY_HEALTH_CA, $GATEWAY_HEALTH_CERT, $GATEWAY_HEALTH_KEY and "
                                        "$GATEWAY_HEALTH_SERVER_NAME.")
    health.add_argument("--target", default=None, metavar="HOST:PORT",
                        help="the server (default: $GATEWAY_HEALTH_TARGET, else 127.0.0.1:50051)")
    health.add_argument("--ca", type=Path, default=None, help="CA certificate for TLS (default: $GATEWAY_HEALTH_CA)")
    health.add_argument("--cert", type=Path, default=None,
                        help="client certificate, for a server that requires one (default: $GATEWAY_HEALTH_CERT)")
    health.add_argument("--key", type=Path, default=None, help="its key (default: $GATEWAY_HEALTH_KEY)")
    health.add_argument("--server-name", default=None,
                        help="the name expected in the server's certificate (default: $GATEWAY_HEALTH_SERVER_NAME, "
                             "else the target's host)")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    health.set_defaults(run=_health)

    audit = sub.add_parser("audit", help="audit log").add_subparsers(required=True, metavar="ACTION")
    verify = audit.add_parser("verify", help="check the audit log's hash chain and the ledger's anchors of it")
    verify.add_argument("path", type=Path, help="the site's state dir, or its audit log file")
    verify.add_argument("--ledger", type=Path, default=None,
                        help="the ledger holding the anchors (default: ledger.sqlite beside the audit log)")
    verify.set_defaults(run=_audit_verify)
    tail = audit.add_parser("tail", help="print the last audit records")
    tail.add_argument("path", type=Path, help="the site's state dir, or its audit log file")
    tail.add_argument("-n", type=int, default=20, help="how many records, the newest last (default: 20)")
    tail.add_argument("--project", default=None, help="only this project's records")
    tail.add_argument("--outcome", default=None,
                      help="only this outcome: ok, cached, dry_run, budget_exhausted, denied, invalid, "
                           "unauthenticated, error, ... (policy reloads: accepted, refused)")
    tail.add_argument("--event", default=None, help="only this event: query, policy_reload, unauthenticated, ...")
    tail.add_argument("--since", default=None, metavar="WHEN",
                      help="only records at or after WHEN: an ISO date/time (UTC unless it says) or an age such "
                           "as 24h, 7d")
    tail.add_argument("--until", default=None, metavar="WHEN", help="only records before WHEN (same forms)")
    tail.add_argument("--json", action="store_true", help="the records as JSON lines, as stored")
    tail.set_defaults(run=_audit_tail)
    console_parser(sub)
    return parser


def _target_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, metavar="HOST:PORT", help="a site or a broker")
    parser.add_argument("--token", default=None, help="bearer token (default: $GATEWAY_TOKEN)")
    parser.add_argument("--proof-key", type=Path, default=None, metavar="FILE",
                        help="the private key the token is bound to (default: $GATEWAY_PROOF_KEY)")
    parser.add_argument("--ca", type=Path, help="CA certificate for TLS")
    parser.add_argument("--cert", type=Path, help="client certificate for mTLS")
    parser.add_argument("--key", type=Path, help="client key for mTLS")


def _client(args: argparse.Namespace) -> Any:
    from ._transport import Tls
    from .client import Client

    token = args.token or os.environ.get("GATEWAY_TOKEN")
    if not token:
        raise UserError("no token: pass --token or set GATEWAY_TOKEN (see 'gateway token mint --help')")
    proof_key = args.proof_key or os.environ.get("GATEWAY_PROOF_KEY")
    if not proof_key:
        raise UserError("no proof key: pass --proof-key FILE or set GATEWAY_PROOF_KEY (the key your token is bound "
                        "to; see 'gateway token mint --help')")
    tls = Tls(args.ca, args.cert, args.key) if args.ca else None
    try:
        return Client(args.target, token=token, tls=tls, proof_key=Path(proof_key))
    except ValueError as err:
        raise UserError(str(err)) from None


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if not 1 <= args.sites <= 4:
        raise UserError("--sites must be 1 to 4")
    if not 100 <= args.patients <= 10_000_000:
        raise UserError("--patients must be 100 to 10000000")
    return run_demo(args.sites, args.patients, args.keep_running, tls=args.tls)


def _synth(args: argparse.Namespace) -> int:
    from .demo.synth import synthesize

    if args.patients < 1:
        raise UserError("--patients must be at least 1")
    summary = synthesize(args.site, args.patients, args.out, seed=args.seed)
    print(f"wrote {summary.patients} patients and {summary.treatment_rows} treatment rows for site "
          f"{summary.site} to {summary.path} in {summary.seconds:.1f}s")
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from .auth import generate_dev_key

    private, public = generate_dev_key(args.out)
    print(f"DEVELOPMENT key pair (not for production): private {private}, public {public}")
    return 0


def _mint(args: argparse.Namespace) -> int:
    from .auth import DEFAULT_MAX_LIFETIME, DEV_AUDIENCE, DEV_ISSUER, mint_dev_token, parse_ttl
    from .proof import ProofKey

    where = args.proof_key or os.environ.get("GATEWAY_PROOF_KEY")
    if not where:
        raise UserError("no proof key: pass --proof-key FILE (created if missing) or set GATEWAY_PROOF_KEY; "
                        "tokens are bound to the key that signs each call's proof")
    try:
        proof_key, created = ProofKey.load_or_create(Path(where))
    except (OSError, ValueError) as err:
        raise UserError(str(err)) from None
    ttl = parse_ttl(args.ttl)
    token = mint_dev_token(args.key.read_bytes(), args.subject, args.project, args.role, ttl,
                           args.issuer or DEV_ISSUER, args.audience or DEV_AUDIENCE, proof_jkt=proof_key.jkt)
    print(token)
    if created:
        print(f"note: created the proof key {where} (keep it private: it signs every call)", file=sys.stderr)
    print("note: DEVELOPMENT token signed with a local key", file=sys.stderr)
    if ttl > DEFAULT_MAX_LIFETIME:
        print(f"note: servers refuse tokens living longer than their --max-token-lifetime (default "
              f"{DEFAULT_MAX_LIFETIME.total_seconds() / 3600:.0f}h)", file=sys.stderr)
    return 0


def _params(pairs: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--param needs K=V, got {pair!r}")
        params[key] = _number(value)
    return params


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _query(args: argparse.Namespace) -> int:
    from .errors import MissingSitesWarning
    from .render import query_json, query_table

    with _client(args) as client, warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingSitesWarning)  # said below, in one line of our own
        result = client.query(args.sql, template=args.template, params=_params(args.param) or None,
                              epsilon=args.epsilon, dry_run=args.dry_run, query_id=args.query_id, sites=args.site,
                              require_all_sites=args.require_all_sites, single_site=args.single_site)
    print(json.dumps(query_json(result.response), allow_nan=False) if args.json else query_table(result.response))
    if result.missing_sites:
        print(f"warning: the answer lacks site(s) {', '.join(result.missing_sites)}: pooled from "
              f"{', '.join(result.sites)} only (--require-all-sites refuses such answers)", file=sys.stderr)
    return 0


def _budget(args: argparse.Namespace) -> int:
    from .errors import MissingSitesWarning

    with _client(args) as client, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MissingSitesWarning)  # said below, in one line of our own
        frame = client.budget(args.dataset)
    missing = {site: why for w in caught if isinstance(w.message, MissingSitesWarning)
               for site, why in w.message.missing.items()}
    listed = [dict(zip(("site", "reason", "message"), (site, *why.split(": ", 1)), strict=True))
              for site, why in missing.items()]  # as in a query's answer
    if args.json:
        print(json.dumps({"budgets": frame.to_dicts(), "missing_sites": listed}, default=_rfc3339))
    else:
        from .render import budget_table

        print(budget_table(frame))
    if listed:
        print("warning: no budget from site(s) " + ", ".join(f"{m['site']} ({m['reason']})" for m in listed)
              + ": they did not answer", file=sys.stderr)
    return 0


def _status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.status()
    rows = status.sites.to_dicts()
    if args.json:
        print(json.dumps({"served_by": status.served_by, "version": status.version, "component": status.component,
                          "sites": rows}, default=_rfc3339))
    else:
        from .render import status_table

        print(status_table(status))
    return 1 if any(r["health"] != "serving" for r in rows) else 0


def _rfc3339(value: Any) -> str:
    if not isinstance(value, datetime):
        raise TypeError(f"cannot write {type(value).__name__} as JSON")
    return value.isoformat().replace("+00:00", "Z")


def _datasets(args: argparse.Namespace) -> int:
    import dataclasses

    with _client(args) as client:
        found = client.datasets()
    if args.json:
        print(json.dumps([dataclasses.asdict(d) for d in found], indent=2, default=str))
        return 0
    if not found:
        print("no dataset you may query")
    for d in found:
        sites = f" at {', '.join(d.sites)}" if d.sites else ""
        print(f"{d.name}{sites}: {d.description}".rstrip(": "))
        print(f"  aggregates {', '.join(d.aggregates)}; epsilon per query {d.epsilon_default:g} (max "
              f"{d.epsilon_max:g}); at most {d.max_rows_per_unit} row(s) per patient"
              + ("; templates only" if d.templates_only else ""))
        for c in d.columns:
            extra = f" bounds [{c.bounds[0]:g}, {c.bounds[1]:g}]" if c.bounds else ""
            keys = f" keys {', '.join(map(str, c.public_keys[:12]))}{' ...' if len(c.public_keys) > 12 else ''}" \
                if c.public_keys else ""
            print(f"  {c.name:<24} {c.type:<8} {', '.join(c.roles):<26}{extra}{keys}".rstrip())
        for t in d.templates:
            print(f"  template {t.name}: {t.description}".rstrip(": "))
    return 0


def _history(args: argparse.Namespace) -> int:
    from .render import query_json

    with _client(args) as client:
        past = client.history(args.limit)
    entries = past.response.entries
    if args.json:
        print(json.dumps([{"site": e.site, "at": e.at, "query_id": e.query_id, "dataset": e.dataset,
                           "epsilon_charged": e.epsilon_charged, "canonical_query": e.canonical_query,
                           "answer": query_json(e.answer)} for e in entries], indent=2))
        return 0
    if not entries:
        print("no answers yet")
    for e in entries:
        query = json.loads(e.canonical_query) if e.canonical_query else {}
        what = ", ".join(query.get("aggregates", [])) + (f" by {', '.join(query['group_by'])}"
                                                          if query.get("group_by") else "")
        print(f"{e.at}  {e.site:<10} epsilon {e.epsilon_charged:<6g} {e.dataset}: {what}  [{e.query_id}]")
    print(f"{len(entries)} answer(s), epsilon {sum(e.epsilon_charged for e in entries):g} in all")
    return 0


def _mcp(args: argparse.Namespace) -> int:
    try:
        from .mcp_server import serve_stdio
    except ImportError as err:
        if err.name is None or not err.name.startswith("mcp"):
            raise
        raise UserError("gateway mcp needs the mcp extra: pip install 'gateway[mcp]'") from None
    if args.max_epsilon_per_session is not None and not args.max_epsilon_per_session > 0:
        raise UserError("--max-epsilon-per-session must be positive")
    with _client(args) as client:
        serve_stdio(client, args.max_epsilon_per_session)
    return 0


def _certs_dev(args: argparse.Namespace) -> int:
    from .demo.certs import make_dev_certs

    sites = [n.strip() for n in args.sites.split(",") if n.strip()]
    if not sites:
        raise UserError("--sites needs at least one name")
    if not 1 <= args.days <= 825:
        raise UserError("--days must be 1 to 825")
    try:
        certs = make_dev_certs(args.out, [*sites, args.broker], days=args.days)
    except FileExistsError as err:
        raise UserError(str(err)) from None
    print(f"DEVELOPMENT-ONLY certificates (not for production) in {certs.folder}, valid until "
          f"{certs.not_after:%Y-%m-%d}:")
    print(f"  development CA (trust it: --client-ca at the sites, tls ca at the broker, --ca at clients): {certs.ca}")
    for name in sites:
        print(f"  site {name}: {certs.cert(name)} and its key {certs.key(name)}")
    print(f"  broker {args.broker} (its client certificate for the sites, and its server certificate): "
          f"{certs.cert(args.broker)} and its key {certs.key(args.broker)}")
    print(f"A site requiring the broker's certificate: --tls-cert {certs.cert(sites[0])} --tls-key "
          f"{certs.key(sites[0])} --client-ca {certs.ca} --allow-peer {args.broker}")
    return 0


def _health(args: argparse.Namespace) -> int:
    from grpc import RpcError
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from ._transport import Tls, open_channel

    env = os.environ
    target = args.target or env.get("GATEWAY_HEALTH_TARGET") or "127.0.0.1:50051"
    ca, cert, key = (given or (Path(env[name]) if env.get(name) else None) for given, name in
                     ((args.ca, "GATEWAY_HEALTH_CA"), (args.cert, "GATEWAY_HEALTH_CERT"),
                      (args.key, "GATEWAY_HEALTH_KEY")))
    if (cert is None) != (key is None):
        raise UserError("--cert and --key go together")
    if cert is not None and ca is None:
        raise UserError("--cert needs --ca (a client certificate is presented over TLS only)")
    tls = Tls(ca, cert, key, args.server_name or env.get("GATEWAY_HEALTH_SERVER_NAME")) if ca else None
    with open_channel(target, tls) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout)
        except RpcError as err:
            print(f"{target}: not healthy: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
