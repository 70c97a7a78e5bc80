"""The broker's settings: its sites, their addresses and TLS, the deadline and quorum, and how it serves.

One YAML file (``--config``), ``GATEWAY_BROKER_*`` variables and flags, in the order of precedence
flags > environment > file > defaults (see :mod:`gateway._settings`); docs/server-config.md is
generated from :class:`BrokerConfig`. Unknown keys are errors and every problem is reported as
``where: field: reason`` (``file:line`` for the file). Paths in the file, the sites' TLS paths
included, are relative to the file. The sites are given in the file only.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .._server import is_loopback
from .._settings import ServerSettings, Sources, load_settings
from .._transport import Tls
from .._yamlfile import ConfigFileError

ENV_PREFIX = "GATEWAY_BROKER_"


class SiteEntry(BaseModel):
    """One site the broker fans out to."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    """The site's own name (its policy's ``site:``): callers address each site's proof of possession to it."""
    address: str
    """``host:port`` of the site gateway."""
    tls: Tls | None = None
    """``{ca, cert, key, server_name}``: the CA that signed the site's certificate (required), the broker's
    client certificate and key for mTLS, and the name expected in the site's certificate if not the
    host's. Without it, plaintext: loopback only."""

    @model_validator(mode="after")
    def _secure(self) -> SiteEntry:
        if self.tls is None and not is_loopback(self.address.rsplit(":", 1)[0]):
            raise ValueError(f"site {self.name} needs tls: plaintext is for loopback only")
        if self.tls is not None and self.tls.ca is None:
            raise ValueError(f"site {self.name}: tls needs ca (the CA that signed the site's certificate)")
        return self


class BrokerConfig(ServerSettings):
    """The broker's settings: one YAML file (``--config``), ``GATEWAY_BROKER_*`` variables or flags."""

    name: str = "broker"
    """The broker's name, in its log and status."""
    sites: tuple[SiteEntry, ...] = Field(min_length=1)
    """The sites the broker fans out to (in the file only)."""
    deadline_seconds: float = Field(default=10.0, gt=0, le=600)
    """How long a query waits for the sites; a site that has not answered by then is listed as missing."""
    min_sites: int = Field(default=1, ge=1)
    """Fewer answering sites than this fails the query instead of pooling."""
    reconnect_seconds: float = Field(default=1.0, gt=0, le=120)
    """The longest wait between attempts to reach a site that is down: a restarted site answers again
    within about this long (plus 20% jitter)."""
    port: int = Field(default=50050, ge=0, le=65535)
    """Port to serve on; 0: any free port (see ``port_file``)."""

    @model_validator(mode="after")
    def _consistent(self) -> BrokerConfig:
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise ValueError("site names must be distinct")
        if self.min_sites > len(self.sites):
            raise ValueError("min_sites is larger than the number of sites")
        return self


class BrokerConfigError(ConfigFileError):
    """The broker's settings failed to load; ``problems`` holds one ``where: field: reason`` each."""

    noun = "broker config"


def load_broker_config(path: Path) -> BrokerConfig:
    """Parse and validate one broker config file on its own (flags or variables may complete it)."""
    return _sites_relative(load_settings(BrokerConfig, ENV_PREFIX, Sources(path, {}), BrokerConfigError,
                                         complete=False), path)


def load_broker_settings(file: Path, env: Mapping[str, str], flags: Mapping[str, Any] | None = None
                         ) -> BrokerConfig:
    """The broker's settings from its flags, ``env`` and config ``file``, or raise :class:`BrokerConfigError`."""
    return _sites_relative(load_settings(BrokerConfig, ENV_PREFIX, Sources(file, env, flags or {}),
                                         BrokerConfigError), file)


def _sites_relative(config: BrokerConfig, path: Path) -> BrokerConfig:
    base = path.resolve().parent
    return config.model_copy(update={"sites": tuple(
        s if s.tls is None else s.model_copy(update={"tls": s.tls.relative_to(base)}) for s in config.sites)})
