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

from pydantic import ByteSize, Field, field_validator

from .._engine import EngineLimits
from .._settings import ServerSettings, Sources, load_settings
from .._yamlfile import ConfigFileError

ENV_PREFIX = "GATEWAY_SITE_"
MIN_ENGINE_MEMORY = 64 * 2**20  # below this DuckDB cannot load even small datasets


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
    engine_memory_limit: ByteSize | None = None
    """The most memory the query engine (DuckDB) may use, e.g. ``4GB`` or ``512MiB`` (at least 64 MiB);
    a query that needs more is refused with nothing charged, and the data must load within it.
    Default: DuckDB's own, 80% of the machine's memory."""
    engine_threads: int | None = Field(default=None, ge=1, le=1024)
    """Threads the query engine (DuckDB) may use; default: one per core."""

    @field_validator("engine_memory_limit")
    @classmethod
    def _enough_memory(cls, value: ByteSize | None) -> ByteSize | None:
        if value is not None and value < MIN_ENGINE_MEMORY:
            raise ValueError(f"should be at least 64MiB; got {value.human_readable()}")
        return value

    def engine_limits(self) -> EngineLimits:
        """The engine's limits from these settings."""
        return EngineLimits(int(self.engine_memory_limit) if self.engine_memory_limit else None, self.engine_threads)


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
