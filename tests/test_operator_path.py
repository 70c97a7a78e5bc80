"""The README's operator path, "From nothing to a network on one machine", run as written: two sites
and a broker over TLS and mTLS from config files, a query through the broker, and a real Prometheus
scraping all three with the shipped alert rules loaded (step markers: :mod:`tests.helpers.guide`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.helpers.guide import Guide, steps

ROOT = Path(__file__).resolve().parent.parent
HEADING = "### From nothing to a network on one machine"
PORTS = ("50050", "50051", "50052", "9464", "9465", "9466", "9090")
# CI installs Prometheus (.ci/run); elsewhere this test skips with a reason instead of failing
needs_prometheus = pytest.mark.skipif(not (shutil.which("prometheus") and shutil.which("promtool"))
                                      and not os.environ.get("CI"),
                                      reason="Prometheus not installed (apt-get install prometheus)")


def section() -> str:
    """The README's operator path, up to the next heading."""
    text = (ROOT / "README.md").read_text()
    start = text.index(HEADING)
    return text[start:text.index("\n### ", start + len(HEADING))]


def test_the_operator_path_is_marked_step_by_step():
    kinds = [step.kind for step in steps(section())]
    assert kinds.count("serve") == 4 and kinds.count("file") == 4 and "output" in kinds
    serves = [step.argument for step in steps(section()) if step.kind == "serve"]
    assert serves == ["50051", "50052", "50050", "9090"]  # sites, broker, Prometheus: each waited for


@pytest.mark.slow
@needs_prometheus
def test_the_readme_operator_path_runs_as_written(tmp_path):
    for name in ("policies", "deploy"):  # as the section says: the repository's folders linked in
        (tmp_path / name).symlink_to(ROOT / name)
    guide = Guide(tmp_path, ports=PORTS)
    try:
        guide.run(section())
    finally:
        guide.stop()
    assert len(guide.servers) == 4
