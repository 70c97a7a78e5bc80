"""docs/byod.md, the site operator's guide to bringing their own data, run step by step as written
(the step markers: :mod:`tests.helpers.guide`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.guide import Guide, missing_lines, normalised, steps

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "byod.md"


def test_the_guide_marks_its_steps_and_an_output_that_differs_is_found():
    kinds = [step.kind for step in steps(GUIDE.read_text())]
    assert kinds.count("run") >= 6 and kinds.count("serve") == 1 and kinds.count("file") == 2
    assert normalised("I   472 [460, 484]  -3.5") == "I # [#, #] #"
    assert missing_lines("north.yaml: ok\nstage count", "/x/north.yaml: ok\nstage   count\n") == []
    assert missing_lines("north.yaml: ok", "north.yaml: 3 problems") == ["north.yaml: ok"]


@pytest.mark.slow
def test_the_bring_your_own_data_guide_runs_as_written(tmp_path):
    guide = Guide(tmp_path, ports=("50051",))
    try:
        guide.run(GUIDE.read_text())
    finally:
        guide.stop()
    assert guide.servers, "the guide serves a site"
