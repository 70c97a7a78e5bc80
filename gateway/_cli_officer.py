"""The privacy officer's commands: policy check, explain, diff, schema and init; broker check; audit."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ._cli_common import UserError, check_files


def _policy_check(args: argparse.Namespace) -> int:
    from ._policy_lint import policy_warnings
    from .policy import PolicyFileError, load_policy
    from .templates import validate_templates

    failed = False
    for path in args.files:
        warnings: list[str] = []
        try:
            loaded = load_policy(path)
            problems = validate_templates(loaded)
            warnings = policy_warnings(loaded)
            if args.data and not problems:
                problems = _check_data(loaded)
            if args.state_dir is not None and not problems:
                warnings += _check_spent(loaded, args.state_dir)
        except PolicyFileError as err:
            problems = err.problems
        for line in problems + warnings:
            print(line, file=sys.stderr)
        if problems or (warnings and args.strict):
            failed = True
        else:
            print(f"{path}: ok" + (f" ({len(warnings)} warning(s))" if warnings else ""))
    return 1 if failed else 0


def _check_data(loaded: Any) -> list[str]:
    import tempfile

    from ._engine import Engine

    with tempfile.TemporaryDirectory() as work:
        engine = Engine(loaded, Path(work))
        try:
            return engine.check_sources()
        finally:
            engine.close()


def _policy_init(args: argparse.Namespace) -> int:
    from ._policy_init import skeleton

    if args.source.suffix != ".parquet" and "*" not in args.source.name and args.table is None:
        raise UserError("--table is needed for a DuckDB file (parquet files need none)")
    try:
        text = skeleton(args.source, args.table, args.out.parent if args.out else Path.cwd())
    except ValueError as err:
        raise UserError(str(err)) from None
    if args.out is None:
        print(text, end="")
        return 0
    if args.out.exists():
        raise UserError(f"{args.out} exists; choose another --out")
    args.out.write_text(text)
    print(f"wrote {args.out}: complete every CHANGE-ME, then run gateway policy check --data {args.out}")
    return 0


def _check_spent(loaded: Any, state_dir: Path) -> list[str]:
    from ._policy_lint import spent_warnings

    try:
        return spent_warnings(loaded, state_dir / "ledger.sqlite")
    except FileNotFoundError as err:
        raise UserError(f"{err} (is {state_dir} a site's state dir?)") from None


def _broker_check(args: argparse.Namespace) -> int:
    from .broker.config import BrokerConfigError, load_broker_config

    return check_files(args.files, load_broker_config, BrokerConfigError,
                       lambda config: f"{len(config.sites)} site(s): {', '.join(s.name for s in config.sites)}")


def _policy_explain(args: argparse.Namespace) -> int:
    from .policy import PolicyFileError, load_policy
    from .render import explain

    try:
        loaded = load_policy(args.file)
    except PolicyFileError as err:
        raise UserError("invalid policy:\n" + "\n".join(err.problems)) from None
    print(explain(loaded.policy, args.project, args.role))
    return 0


def _policy_schema(args: argparse.Namespace) -> int:
    from .policy import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def _policy_diff(args: argparse.Namespace) -> int:
    from .policy import PolicyFileError, load_policy
    from .render import diff

    try:
        old, new = load_policy(args.old), load_policy(args.new)
    except PolicyFileError as err:
        raise UserError("invalid policy:\n" + "\n".join(err.problems)) from None
    lines = diff(old.policy, new.policy)
    print("\n".join(lines) if lines else "no differences")
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    import sqlite3

    from .audit import verify
    from .ledger import anchors

    path = _audit_log(args.path)
    ledger = args.ledger if args.ledger is not None else path.parent / "ledger.sqlite"
    if args.ledger is not None and not ledger.is_file():
        raise UserError(f"no ledger at {ledger}")
    checked = ledger.is_file() and ledger.stat().st_size > 0
    try:
        result = verify(path, anchors(ledger) if checked else None)
    except sqlite3.Error as err:
        raise UserError(f"cannot read the ledger {ledger}: {err}") from None
    against = (f"{result.anchors} release record(s) match their anchors in {ledger}" if checked else
               "no ledger beside it: a truncated or recomputed chain cannot be detected (give --ledger)")
    if result.ok:
        print(f"{path}: ok, {result.records} records, chain intact; {against}")
        return 0
    print(f"{path}: TAMPERED: {result.problem} ({result.records} records verified before it)", file=sys.stderr)
    return 1


def _audit_tail(args: argparse.Namespace) -> int:
    from .audit import records

    since, until = _when(args.since), _when(args.until)
    wanted = [r for r in records(_audit_log(args.path))
              if (args.project is None or r.get("project") == args.project)
              and (args.outcome is None or r.get("outcome") == args.outcome)
              and (args.event is None or r.get("event") == args.event)
              and (since is None or float(r.get("time", 0)) >= since)
              and (until is None or float(r.get("time", 0)) < until)]
    for record in wanted[-args.n:] if args.n > 0 else []:
        print(json.dumps(record, sort_keys=True) if args.json else _audit_line(record))
    return 0


def _when(text: str | None) -> float | None:
    """``--since`` / ``--until``: an ISO date or time (UTC unless it says), or an age such as 24h or 7d."""
    if text is None:
        return None
    from datetime import UTC, datetime

    from .auth import parse_ttl

    try:
        return (datetime.now(UTC) - parse_ttl(text)).timestamp()
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UserError(f"{text!r} is neither an ISO date/time (2026-11-23, 2026-11-23T08:00) nor an age (24h, 7d)"
                        ) from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _audit_line(record: dict[str, Any]) -> str:
    """One record for an officer's terminal: when, what, who, on what, what it cost, and why."""
    event = record.get("event", "?")
    what = record.get("outcome", event)
    who = f"{record['project']}/{record.get('subject', '?')}" if "project" in record else record.get("source", "")
    if event == "query":
        cost = record.get("epsilon_charged", record.get("epsilon_requested"))
        where = f"{record.get('dataset', '?')} ({record.get('population', '?')})" if "dataset" in record else ""
        detail = " ".join(str(x) for x in (where, f"epsilon {cost:g}" if isinstance(cost, float | int) else "",
                                           record.get("reason", ""), record.get("canonical_query", "")) if x)
    elif event == "policy_reload":
        detail = record.get("reason") or "; ".join(record.get("changes", [])) or "no change that matters"
    elif event == "unauthenticated":
        detail = f"{record.get('unauthenticated_rejections')} call(s): {record.get('reasons', {})}"
    else:
        detail = ", ".join(f"{k}={v}" for k, v in record.items() if k not in ("seq", "time", "at", "prev", "hash"))
    return f"{record.get('at', record.get('time', '?'))}  #{record.get('seq', '?'):<6} {event:<15} {what:<17} " \
           f"{who:<24} {detail}".rstrip()


def _audit_log(path: Path) -> Path:
    """The audit log a command names: the file itself, or the one in a state dir."""
    log_file = path / "audit.jsonl" if path.is_dir() else path
    if not log_file.is_file():
        raise UserError(f"no audit log at {log_file}")
    return log_file


def console_parser(sub: Any) -> None:
    """``gateway console serve``: the officer's web console (needs the console extra)."""
    from ._cli_serve import _token_key_args

    console = sub.add_parser("console", help="the privacy officer's web console").add_subparsers(
        required=True, metavar="ACTION")
    serve = console.add_parser("serve", help="serve read-only pages of one site's budgets, audit trail, policy and "
                                             "reloads (needs the console extra: pip install 'gateway[console]')")
    serve.add_argument("--policy", type=Path, required=True, help="the policy file the site serves")
    serve.add_argument("--state-dir", type=Path, required=True,
                       help="the site's state dir (read only: the console never blocks the running site)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to serve on (default: 127.0.0.1); any other than loopback needs TLS")
    serve.add_argument("--port", type=int, default=8470, help="port to serve on; 0: any free port (default: 8470)")
    _token_key_args(serve)
    serve.add_argument("--tls-cert", type=Path, help="server certificate (PEM) for HTTPS; needed off loopback")
    serve.add_argument("--tls-key", type=Path, help="the server certificate's private key (PEM)")
    serve.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    serve.set_defaults(run=_console_serve, serves=True)


def _console_serve(args: argparse.Namespace) -> int:
    from ._cli_serve import _verifier
    from .auth import ROLE_CLAIM, parse_ttl
    from .policy import PolicyFileError

    try:
        from .console import open_console
    except ImportError as err:
        if err.name is None or err.name.split(".")[0] not in ("starlette", "jinja2", "uvicorn", "markupsafe"):
            raise
        raise UserError("gateway console serve needs the console extra: pip install 'gateway[console]'") from None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UserError("--tls-cert and --tls-key go together")
    tls = (args.tls_cert, args.tls_key) if args.tls_cert else None
    # the token-key flags as the site's (absent ones are not set at all: their defaults here)
    keys = SimpleNamespace(trusted_keys=getattr(args, "trusted_keys", ()), jwks=getattr(args, "jwks", None),
                           jwks_url=getattr(args, "jwks_url", None), issuer=getattr(args, "issuer", None),
                           audience=getattr(args, "audience", None),
                           max_token_lifetime=getattr(args, "max_token_lifetime", "24h"))
    try:
        parse_ttl(keys.max_token_lifetime)
    except ValueError as err:
        raise UserError(f"--max-token-lifetime: {err}") from None
    given = keys.trusted_keys or keys.jwks is not None or keys.jwks_url is not None
    verifier = _verifier(keys, required_claims=("sub", ROLE_CLAIM)) if given else None  # officers need no project
    try:
        server = open_console(args.policy, args.state_dir, verifier, args.host, args.port, tls)
    except PolicyFileError as err:
        raise UserError("invalid policy:\n" + "\n".join(err.problems)) from None
    except (ValueError, OSError) as err:
        raise UserError(str(err)) from None
    site = server.console.policy.current()[0].policy.site
    print(f"console of site {site} on {server.url}" + ("" if tls else " (plain HTTP, loopback only)"), flush=True)
    if verifier is None:
        print("no token keys given: only the one-time sign-in link below signs in", flush=True)
    link = server.sign_in_link()
    if link is not None:
        print(f"one-time sign-in link (works once, for 10 minutes): {link}", flush=True)
    if args.port_file:
        args.port_file.write_text(str(server.port))
    server.serve()
    return 0
