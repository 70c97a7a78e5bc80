"""The broker's configuration file: its sites, their addresses and TLS, the deadline and quorum.

Loaded like a site policy (:mod:`gateway._yamlfile`): unknown keys are errors and every problem
is reported as ``file:line: field: reason``. TLS paths are relative to the file.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .._server import is_loopback
from .._transport import Tls
from .._yamlfile import ConfigFileError, load_model


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SiteEntry(_Model):
    """One site the broker fans out to."""

    # the site's own name (its policy's `site:`): callers address each site's proof of possession to it
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    address: str
    tls: Tls | None = None

    @model_validator(mode="after")
    def _secure(self) -> SiteEntry:
        if self.tls is None and not is_loopback(self.address.rsplit(":", 1)[0]):
            raise ValueError(f"site {self.name} needs tls: plaintext is for loopback only")
        if self.tls is not None and self.tls.ca is None:
            raise ValueError(f"site {self.name}: tls needs ca (the CA that signed the site's certificate)")
        return self


class BrokerConfig(_Model):
    """The broker's configuration file."""

    name: str = "broker"
    sites: tuple[SiteEntry, ...] = Field(min_length=1)
    deadline_seconds: float = Field(default=10.0, gt=0, le=600)
    min_sites: int = Field(default=1, ge=1)
    # the longest wait between attempts to reach a site that is down: a restarted site answers
    # again within about this long (plus 20% jitter)
    reconnect_seconds: float = Field(default=1.0, gt=0, le=120)

    @model_validator(mode="after")
    def _consistent(self) -> BrokerConfig:
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise ValueError("site names must be distinct")
        if self.min_sites > len(self.sites):
            raise ValueError("min_sites is larger than the number of sites")
        return self


class BrokerConfigError(ConfigFileError):
    """A broker configuration file failed to load; ``problems`` holds one ``file:line: field: reason`` each."""

    noun = "broker config"


def load_broker_config(path: Path) -> BrokerConfig:
    """Parse and validate a broker config file, or raise :class:`BrokerConfigError` with every problem."""
    config, _text = load_model(path, BrokerConfig, BrokerConfigError)
    base = path.resolve().parent
    return config.model_copy(update={"sites": tuple(
        s if s.tls is None else s.model_copy(update={"tls": s.tls.relative_to(base)}) for s in config.sites)})
