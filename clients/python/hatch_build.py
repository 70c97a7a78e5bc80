"""Build hooks for `gateway-client`: ship the listed client modules of the `gateway` package.

In the repository the package lives two levels up (``../../gateway``); in an unpacked sdist it sits
next to this file (the sdist is built with a copy of the listed files). Both hooks look there first.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface
from hatchling.metadata.plugin.interface import MetadataHookInterface

PACKAGE = "gateway"


def package_dir(root: str) -> Path:
    """Where the ``gateway`` package's sources are: beside this file (sdist) or in the repository."""
    for candidate in (Path(root) / PACKAGE, Path(root).parent.parent / PACKAGE):
        if (candidate / "_version.py").is_file():
            return candidate.resolve()
    message = f"cannot find the {PACKAGE!r} package next to {root} or two levels up"
    raise FileNotFoundError(message)


class VersionHook(MetadataHookInterface):
    """Take the version from gateway/_version.py, the single place it is written."""

    def update(self, metadata: dict[str, Any]) -> None:
        text = (package_dir(self.root) / "_version.py").read_text(encoding="utf-8")
        match = re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", text, re.MULTILINE)
        if match is None:
            message = "no __version__ = '...' line in gateway/_version.py"
            raise ValueError(message)
        metadata["version"] = match.group(1)


class ClientModulesHook(BuildHookInterface):
    """Force-include exactly the modules listed in ``[tool.hatch.build.hooks.custom] modules``."""

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        source = package_dir(self.root)
        patterns = self.config.get("modules", [])
        if not patterns:
            message = "[tool.hatch.build.hooks.custom] modules is empty"
            raise ValueError(message)
        for pattern in patterns:
            files = sorted(p for p in source.glob(pattern) if p.is_file() and "__pycache__" not in p.parts)
            if not files:
                self.app.display_warning(f"gateway-client: no file matches {PACKAGE}/{pattern}; skipped")
            for path in files:
                build_data["force_include"][str(path)] = f"{PACKAGE}/{path.relative_to(source).as_posix()}"
