"""The ``gateway`` command run as a user runs it: a separate process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

GATEWAY = [sys.executable, "-m", "gateway.cli"]
"""The argv prefix that runs the command line of the package under test."""


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``gateway ARGS...`` to completion (``env`` adds to this process's environment)."""
    return subprocess.run([*GATEWAY, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, check=False)


def wait_for_port_file(proc: subprocess.Popen[Any], port_file: Path, timeout: float = 60) -> str:
    """Where a server started with ``--port 0 --port-file PORT_FILE`` listens, once it has said: HOST:PORT."""
    deadline = time.monotonic() + timeout
    while not (port_file.exists() and port_file.read_text()):
        assert proc.poll() is None, proc.communicate()[1]  # its stderr, when captured
        assert time.monotonic() < deadline, f"no port in {port_file} after {timeout} s"
        time.sleep(0.05)
    return f"127.0.0.1:{port_file.read_text()}"
