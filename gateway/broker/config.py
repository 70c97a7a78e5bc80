"""The broker's configuration file: its sites, their addresses and TLS, the deadline and quorum."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .._server import is_loopback
from .._transport import Tls


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SiteEntry(_Model):
    """One site the broker fans out to."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    address: str
    tls: Tls | None = None


class BrokerConfig(_Model):
    """The broker's configuration file."""

    name: str = "broker"
    sites: tuple[SiteEntry, ...] = Field(min_length=1)
    deadline_seconds: float = Field(default=10.0, gt=0, le=600)
    min_sites: int = Field(default=1, ge=1)


def load_broker_config(path: Path) -> BrokerConfig:
    """Parse and validate a broker config file; raises ValueError with every problem."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        config = BrokerConfig.model_validate(data)
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: {err}") from None
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ValueError(f"{path}: {problems}") from None
    names = [s.name for s in config.sites]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: site names must be distinct")
    if config.min_sites > len(config.sites):
        raise ValueError(f"{path}: min_sites is larger than the number of sites")
    for site in config.sites:
        if site.tls is None and not is_loopback(site.address.rsplit(":", 1)[0]):
            raise ValueError(f"{path}: site {site.name} needs tls: plaintext is for loopback only")
        if site.tls is not None and site.tls.ca is None:
            raise ValueError(f"{path}: site {site.name}: tls needs ca (the CA that signed the site's certificate)")
    # TLS paths in the file are relative to it
    base = path.resolve().parent
    return config.model_copy(update={"sites": tuple(
        s if s.tls is None else s.model_copy(update={"tls": s.tls.relative_to(base)}) for s in config.sites)})
