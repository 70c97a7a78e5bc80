"""Server settings: a YAML file, the environment and flags, read once into one frozen model per server.

``gateway site serve`` and ``gateway broker serve`` take each setting from, first found: a flag, an
environment variable, the config file (``--config FILE``), the default. A setting has one name in
three spellings: the key ``metrics_port``, the variable ``GATEWAY_SITE_METRICS_PORT`` (at the broker
``GATEWAY_BROKER_METRICS_PORT``) and the flag ``--metrics-port``. A list is a YAML list in the file,
comma-separated in a variable and a repeated flag. Paths in the file are relative to the file's
folder; in a variable or a flag, to the working directory. Keys stay in files: a setting names the
file, never holds the key.

Every problem is reported as ``where: field: reason``, where is ``file:line`` for the file (an
unknown key with "did you mean"), ``$VARIABLE`` for the environment and ``--flag`` for a flag. The
loader takes the environment as an argument, so tests pass their own.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ._yamlfile import ConfigFileError, _model_in, line_index, problems_of, read_mapping

LIST_FLAGS = {"trusted_keys": "--trusted-key", "allow_peers": "--allow-peer"}  # repeated flags, singular


def flag_name(key: str) -> str:
    """The command-line flag of a setting: ``metrics_port`` is ``--metrics-port``."""
    return LIST_FLAGS.get(key, "--" + key.replace("_", "-"))


def env_name(prefix: str, key: str) -> str:
    """The environment variable of a setting: ``metrics_port`` at a site is ``GATEWAY_SITE_METRICS_PORT``."""
    return prefix + key.upper()


class ServerSettings(BaseModel):
    """What a site and a broker both need to serve: address, TLS, token keys, metrics and shutdown."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    host: str = "127.0.0.1"
    """Address to serve on. Plaintext is refused anywhere but loopback: elsewhere give ``tls_cert`` and
    ``tls_key``."""
    port: int = Field(default=0, ge=0, le=65535)
    """Port to serve on; 0: any free port (see ``port_file``)."""
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """Serve Prometheus ``/metrics`` on this port (none by default)."""
    metrics_host: str | None = None
    """Where ``/metrics`` listens. Default: loopback for a loopback server, else ``host``. The metrics
    name every project and its spend: they never listen on all interfaces unless told to."""
    tls_cert: Path | None = None
    """This server's certificate (PEM) for TLS."""
    tls_key: Path | None = None
    """The certificate's private key (PEM file; its path, never the key itself)."""
    trusted_keys: tuple[Path, ...] = ()
    """PEM public keys trusted to sign tokens. At least one of ``trusted_keys``, ``jwks`` and
    ``jwks_url`` is needed."""
    jwks: Path | None = None
    """A JWKS file of trusted token keys."""
    jwks_url: str | None = None
    """Your identity provider's JWKS URL (https): keys fetched at start, cached and refreshed as they
    rotate."""
    issuer: str | None = None
    """The token issuer expected (``iss``). Default: the development one."""
    audience: str | None = None
    """The token audience expected (``aud``). Default: the development one."""
    max_token_lifetime: str = "24h"
    """Tokens valid for longer than this (``exp - iat``) are refused, e.g. ``12h``; units s, m, h, d."""
    drain_seconds: float | None = Field(default=None, ge=0)
    """On SIGTERM, report NOT_SERVING through gRPC health and keep serving this long before stopping,
    so probes and load balancers move traffic away. Default: 5, 0 on loopback."""
    stop_grace: float = Field(default=10.0, ge=0)
    """Then refuse new calls and give calls in flight this long to finish."""
    port_file: Path | None = None
    """Write the bound port here once serving (with ``port: 0``)."""

    @field_validator("max_token_lifetime")
    @classmethod
    def _duration(cls, value: str) -> str:
        from .auth import parse_ttl

        parse_ttl(value)
        return value

    def problems(self) -> list[tuple[str, str]]:
        """What the settings get wrong together, as (field, reason), once every source is read."""
        found = []
        if (self.tls_cert is None) != (self.tls_key is None):
            found.append(("tls_key" if self.tls_key is None else "tls_cert", "tls_cert and tls_key go together"))
        if not self.trusted_keys and self.jwks is None and self.jwks_url is None:
            found.append(("trusted_keys", "no token keys: give trusted_keys (--trusted-key PEM), jwks or jwks_url"))
        return found


S = TypeVar("S", bound=ServerSettings)


@dataclass(frozen=True)
class Sources:
    """Where a server's settings come from: its config file (or None), the environment, the flags given."""

    file: Path | None
    env: Mapping[str, str]
    flags: Mapping[str, Any] = field(default_factory=dict)  # setting -> value, only the flags given


def env_settings(model: type[BaseModel]) -> list[str]:
    """The settings a variable may set: those of plain values and lists of them (not the broker's sites)."""
    return [name for name, info in model.model_fields.items() if _model_in(info.annotation) is None]


def load_settings(model: type[S], prefix: str, sources: Sources, error: type[ConfigFileError],
                  complete: bool = True) -> S:
    """Read ``model`` from ``sources`` (flags > environment > file > defaults), or raise ``error``.

    ``complete``: the sources are all there is, so the settings must hold together (token keys, TLS
    pairs); False checks one file that flags or variables may complete.
    """
    data: dict[str, Any] = {}
    lines: dict[tuple[str, ...], int] = {}
    if sources.file is not None:
        data, node, _text = read_mapping(sources.file, error)
        lines = line_index(node)
    env = _from_env(model, prefix, sources.env, error)
    origin = {**dict.fromkeys(data, "file"), **dict.fromkeys(env, "env"), **dict.fromkeys(sources.flags, "flag")}

    def where(line: int, key: str) -> str:
        if origin.get(key) == "env":
            return "$" + env_name(prefix, key)
        if origin.get(key) == "flag" or (sources.file is None and key in model.model_fields):
            return flag_name(key)
        return f"{sources.file}:{line}" if sources.file is not None else "(settings)"

    merged = {**data, **env, **sources.flags}
    missing = [name for name, info in model.model_fields.items() if info.is_required() and name not in merged]
    try:
        settings = model.model_validate(merged)
    except ValidationError as err:
        said = tuple(f": {name}: is required" for name in missing)  # said again below, with where to give it
        problems = [p for p in problems_of(err, model, lines, where) if not p.endswith(said)]
        raise error([*_missing(missing, prefix, lambda name: where(lines.get((), 1), name)), *problems]) from err
    together = [f"{where(lines.get((name,), lines.get((), 1)), name)}: {name}: {reason}"
                for name, reason in (settings.problems() if complete else [])]
    if together:
        raise error(together)
    return _relative_to_file(settings, [k for k, o in origin.items() if o == "file"], sources.file)


def _missing(names: list[str], prefix: str, where: Callable[[str], str]) -> list[str]:
    return [f"{where(name)}: {name}: is required: give {flag_name(name)}, ${env_name(prefix, name)} or "
            f"{name}: in the config file" for name in names]


def _from_env(model: type[BaseModel], prefix: str, env: Mapping[str, str], error: type[ConfigFileError]
              ) -> dict[str, Any]:
    """The settings the environment gives (an empty variable is unset); an unknown ``prefix`` variable is an error."""
    names = {env_name(prefix, name): name for name in env_settings(model)}
    reserved = {prefix + "CONFIG"}  # names the config file itself
    found: dict[str, Any] = {}
    problems = []
    for variable, value in sorted(env.items()):
        if not variable.startswith(prefix) or variable in reserved or not value.strip():
            continue
        name = names.get(variable)
        if variable.removeprefix(prefix).lower() in model.model_fields and name is None:
            problems.append(f"${variable}: {variable.removeprefix(prefix).lower()}: cannot be set from the "
                            "environment: give it in the config file")
            continue
        if name is None:
            close = difflib.get_close_matches(variable, list(names), n=1, cutoff=0.6)
            hint = f"did you mean ${close[0]}? " if close else ""
            problems.append(f"${variable}: (environment): unknown setting; {hint}known variables: "
                            f"{', '.join(sorted(names))}")
            continue
        annotation = str(model.model_fields[name].annotation)
        found[name] = ([v.strip() for v in value.split(",") if v.strip()] if annotation.startswith("tuple")
                       else value.strip())
    if problems:
        raise error(problems)
    return found


def _relative_to_file(settings: S, from_file: list[str], file: Path | None) -> S:
    """Paths the file gives, resolved against the file's folder (absolute paths stay as they are)."""
    if file is None:
        return settings
    base = file.resolve().parent
    updates: dict[str, Any] = {}
    for name in from_file:
        value = getattr(settings, name, None)
        if isinstance(value, Path):
            updates[name] = base / value
        elif isinstance(value, tuple) and value and all(isinstance(v, Path) for v in value):
            updates[name] = tuple(base / v for v in value)
    return settings.model_copy(update=updates) if updates else settings
