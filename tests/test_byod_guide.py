"""docs/byod.md, the site operator's guide to bringing their own data, run step by step as written.

The guide marks its steps with HTML comments before code blocks: ``<!-- run -->`` (a bash block
that must exit 0; ``<!-- run: exit N -->`` must exit N), ``<!-- output -->`` (lines the previous
step must print; numbers may differ, since answers are noised), ``<!-- file: NAME -->`` (the block
is written to NAME) and ``<!-- serve -->`` (a server started in the background and used by the
steps after it). Each step runs in one folder, with this checkout's ``gateway`` first on PATH; the
guide's port is replaced by a free one.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STEP = re.compile(r"<!-- (run(?:: exit (\d+))?|output|serve|file: ([\w./-]+)) -->\n```\w*\n(.*?)```", re.S)
GUIDE_PORT = "50051"


def steps(text: str) -> list[tuple[str, int, str, str]]:
    """(kind, expected exit status, file name, block) of each marked block, in order."""
    return [(m.group(1).split(":")[0], int(m.group(2) or 0), m.group(3) or "", m.group(4))
            for m in STEP.finditer(text)]


def normalised(text: str) -> str:
    """Numbers as ``#`` and runs of blanks as one space: a noisy answer matches its shape."""
    return " ".join(re.sub(r"-?\d+(?:\.\d+)?", "#", text).split())


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _wait_for(port: str, server: subprocess.Popen[bytes], log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert server.poll() is None, f"the server exited: {log.read_text()}"
        assert time.monotonic() < deadline, f"nothing listens on {port}: {log.read_text()}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", int(port))) == 0:
                return
        time.sleep(0.2)


def test_the_guide_marks_its_steps():
    found = steps((ROOT / "docs" / "byod.md").read_text())
    kinds = [kind for kind, *_ in found]
    assert kinds.count("run") >= 6 and kinds.count("serve") == 1 and kinds.count("file") == 2
    assert normalised("I   472 [460, 484]  -3.5") == "I # [#, #] #"


@pytest.mark.slow
def test_the_bring_your_own_data_guide_runs_as_written(tmp_path):
    port = _free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("GATEWAY_TOKEN", None)
    server: subprocess.Popen[bytes] | None = None
    output = ""
    try:
        for number, (kind, status, name, raw) in enumerate(steps((ROOT / "docs" / "byod.md").read_text())):
            block = raw.replace(GUIDE_PORT, port)
            where = f"step {number} ({kind}): {block.strip()[:80]}"
            if kind == "file":
                (tmp_path / name).write_text(block)
            elif kind == "output":
                have = [normalised(line) for line in output.splitlines()]
                for line in filter(str.strip, block.splitlines()):
                    assert any(normalised(line) in h for h in have), f"{where}: {line!r} not in\n{output}"
            elif kind == "serve":
                log = tmp_path / "server.log"
                with log.open("wb") as sink:
                    server = subprocess.Popen(["bash", "-c", block], cwd=tmp_path, env=env, stdout=sink,
                                              stderr=subprocess.STDOUT, start_new_session=True)
                _wait_for(port, server, log)
            else:
                done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env,
                                      capture_output=True, text=True, timeout=180, check=False)
                output = done.stdout + done.stderr
                assert done.returncode == status, f"{where}: exit {done.returncode}\n{output}"
                assert "Traceback" not in output, f"{where}\n{output}"
        assert server is not None
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # the session this test started for the server
            server.wait(timeout=30)
