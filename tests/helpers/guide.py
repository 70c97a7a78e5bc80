"""Running a guide's marked steps as written (docs/byod.md, the README's operator path).

A guide marks its steps with HTML comments before code blocks: ``<!-- run -->`` (a bash block
that must exit 0; ``<!-- run: exit N -->`` must exit N; ``<!-- run: retry S -->`` is run again for
up to S seconds until it exits 0 and prints what the next output block says), ``<!-- output -->``
(lines the previous step must print; numbers may differ, since answers are noised), ``<!-- file:
NAME -->`` (the block is written to NAME) and ``<!-- serve: PORT -->`` (a server started in the
background, ready once something listens on PORT, stopped with SIGTERM at the end). Every step
runs in one folder, with this checkout's ``gateway`` first on PATH; each of the guide's fixed
ports is replaced by a free one.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

STEP = re.compile(r"<!-- (run|output|serve|file)(?:: ([^>]*?))? -->\n```\w*\n(.*?)```", re.S)


@dataclass(frozen=True)
class Step:
    """One marked block: its kind, the marker's argument and the block's text."""

    kind: str
    argument: str
    block: str


def steps(text: str) -> list[Step]:
    """Every marked block of ``text``, in order."""
    return [Step(m.group(1), m.group(2) or "", m.group(3)) for m in STEP.finditer(text)]


def normalised(text: str) -> str:
    """Numbers as ``#`` and runs of blanks as one space: a noisy answer matches its shape."""
    return " ".join(re.sub(r"-?\d+(?:\.\d+)?", "#", text).split())


def missing_lines(expected: str, output: str) -> list[str]:
    """The lines of ``expected`` that no line of ``output`` holds (compared :func:`normalised`)."""
    have = [normalised(line) for line in output.splitlines()]
    return [line for line in filter(str.strip, expected.splitlines()) if not any(normalised(line) in h for h in have)]


def free_port() -> str:
    """A free port below the kernel's ephemeral range (32768 and up on Linux).

    The guide's servers bind the port some time after it is chosen; other tests' servers bind
    port 0, which the kernel picks from the ephemeral range, so they cannot take it meanwhile.
    """
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20_000, 32_000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return str(port)
    raise RuntimeError("no free port between 20000 and 32000")


class Guide:
    """Runs a guide's steps in ``folder``; ``ports``: the guide's fixed ports, each replaced by a free one."""

    def __init__(self, folder: Path, ports: tuple[str, ...] = ()) -> None:
        self.folder = folder
        self.ports = {port: free_port() for port in ports}
        self.env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.env.pop("GATEWAY_TOKEN", None)
        self.servers: list[subprocess.Popen[bytes]] = []

    def run(self, text: str) -> None:
        """Run every step of ``text``; an assertion names the step that failed."""
        found = steps(text)
        output = ""
        for number, step in enumerate(found):
            block = self._ported(step.block)
            where = f"step {number} ({step.kind}): {block.strip()[:100]}"
            if step.kind == "file":
                (self.folder / step.argument).write_text(block)
            elif step.kind == "output":
                missing = missing_lines(block, output)
                assert not missing, f"{where}: {missing} not in\n{output}"
            elif step.kind == "serve":
                self._serve(block, self._ported(step.argument), where)
            else:
                expect = found[number + 1].block if number + 1 < len(found) and found[number + 1].kind == "output" \
                    else ""
                output = self._run(block, step.argument, self._ported(expect), where)

    def stop(self) -> None:
        """Stop the servers the steps started (their own sessions, by id)."""
        for server in self.servers:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
        for server in self.servers:
            server.wait(timeout=30)

    def _ported(self, text: str) -> str:
        for fixed, free in self.ports.items():
            text = re.sub(rf"\b{fixed}\b", free, text)
        return text

    def _run(self, block: str, argument: str, expect: str, where: str) -> str:
        status = int(argument.removeprefix("exit ")) if argument.startswith("exit") else 0
        deadline = time.monotonic() + (float(argument.removeprefix("retry ")) if argument.startswith("retry") else 0)
        while True:
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=self.folder, env=self.env,
                                  capture_output=True, text=True, timeout=180, check=False)
            output = done.stdout + done.stderr
            if (done.returncode == status and not missing_lines(expect, output)) or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert done.returncode == status, f"{where}: exit {done.returncode}\n{output}"
        assert "Traceback" not in output, f"{where}\n{output}"
        return output

    def _serve(self, block: str, port: str, where: str, timeout: float = 90) -> None:
        log = self.folder / f"server-{len(self.servers)}.log"
        with log.open("wb") as sink:
            server = subprocess.Popen(["bash", "-c", block], cwd=self.folder, env=self.env, stdout=sink,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        self.servers.append(server)
        deadline = time.monotonic() + timeout
        while True:
            assert server.poll() is None, f"{where}: the server exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"{where}: nothing listens on {port}:\n{log.read_text()}"
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", int(port))) == 0:
                    return
            time.sleep(0.2)
