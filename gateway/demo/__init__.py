"""Demo tooling: synthetic cancer registries, local multi-process networks and the ``gateway demo`` tour.

The example site policies ship as package data (``gateway/demo/policies``), so an installed
``gateway demo`` finds them; the repository's top-level ``policies/`` is the same folder.
"""

from .tour import run_demo

__all__ = ["run_demo"]
