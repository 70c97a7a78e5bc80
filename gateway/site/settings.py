"""A site gateway's settings (``gateway site serve``): its policy, state dir, address, TLS and token keys.

Read by :func:`load_site_settings` from flags, ``GATEWAY_SITE_*`` variables and a YAML file, in that
order of precedence (see :mod:`gateway._settings`); docs/server-config.md is generated from
:class:`SiteSettings`. The policy (what may be queried, at what cost) is the privacy officer's file;
these settings are the operator's.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field

from .._settings import ServerSettings, Sources, load_settings
from .._yamlfile import ConfigFileError

ENV_PREFIX = "GATEWAY_SITE_"


class SiteSettings(ServerSettings):
    """A site gateway's settings: one YAML file (``--config``), ``GATEWAY_SITE_*`` variables or flags."""

    policy: Path
    """The site's policy file (its data paths are relative to it); reloaded when it changes."""
    state_dir: Path | None = None
    """Where the ledger, the audit log and bounded snapshots live; locked to one process, private.
    Default: ``state`` in the working directory (said at start)."""
    port: int = Field(default=50051, ge=0, le=65535)
    """Port to serve on; 0: any free port (see ``port_file``)."""
    client_ca: Path | None = None
    """Require client certificates signed by this CA (mTLS): the broker's."""
    allow_peers: tuple[str, ...] = ()
    """Accept queries only from client certificates with these common names (the broker's)."""


class SiteConfigError(ConfigFileError):
    """A site's settings failed to load; ``problems`` holds one ``where: field: reason`` each."""

    noun = "site config"


def load_site_settings(file: Path | None, env: Mapping[str, str], flags: Mapping[str, Any] | None = None
                       ) -> SiteSettings:
    """A site's settings from its flags, ``env`` and config ``file``, or raise :class:`SiteConfigError`."""
    return load_settings(SiteSettings, ENV_PREFIX, Sources(file, env, flags or {}), SiteConfigError)


def load_site_settings_file(path: Path) -> SiteSettings:
    """Parse and validate one site config file on its own (flags or variables may complete it)."""
    return load_settings(SiteSettings, ENV_PREFIX, Sources(path, {}), SiteConfigError, complete=False)
