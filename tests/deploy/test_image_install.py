"""The image's build stage replayed without Docker: the files deploy/Dockerfile.dockerignore lets into the
build context, the stage's COPY and `uv sync` steps as written, into a fresh environment. What it makes
runs the servers' commands and holds no dev tool. (The base image, the user and the HEALTHCHECK need a
Docker engine: scripts/check_deploy.py checks them as text.)"""

from __future__ import annotations

import fnmatch
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def build_context(target: Path) -> list[str]:
    """Copy what the .dockerignore beside the Dockerfile admits (it excludes all, then re-admits by '!')."""
    rules = [line.strip() for line in (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules[0] == "*", "the build context is an allow-list"
    admitted = [r[1:].rstrip("/") for r in rules[1:] if r.startswith("!")]
    excluded = [r for r in rules[1:] if not r.startswith("!")]
    copied = []
    for path in sorted(p for p in ROOT.rglob("*") if p.is_file() and ".venv" not in p.parts and ".git" not in p.parts):
        name = str(path.relative_to(ROOT))
        if not any(name == a or name.startswith(a + "/") for a in admitted):
            continue
        if any(fnmatch.fnmatch(name, e) or fnmatch.fnmatch(name, e.removeprefix("**/")) or
               any(fnmatch.fnmatch(part, e.removeprefix("**/")) for part in Path(name).parts) for e in excluded):
            continue
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target / name)
        copied.append(name)
    return copied


def build_stage() -> list[tuple[str, str]]:
    """(instruction, value) of the first stage, the one that installs."""
    stages: list[list[tuple[str, str]]] = []
    for item in DockerfileParser(str(DOCKERFILE)).structure:
        if item["instruction"] == "FROM":
            stages.append([])
        elif stages and item["instruction"] != "COMMENT":
            stages[-1].append((item["instruction"], item["value"]))
    return stages[0]


@pytest.mark.slow
def test_build_stage_installs_the_runtime_from_the_lock_without_dev_tools(tmp_path):
    context, workdir, env_dir = tmp_path / "context", tmp_path / "src", tmp_path / "opt-gateway"
    copied = build_context(context)
    assert "uv.lock" in copied and "gateway/cli.py" in copied and not any(n.startswith("tests/") for n in copied)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UV_", "VIRTUAL_ENV"))}
    ran = []
    for instruction, value in build_stage():
        if instruction == "ENV":
            for pair in shlex.split(value):
                key, _, setting = pair.partition("=")
                env[key] = str(env_dir) if key == "UV_PROJECT_ENVIRONMENT" else setting
        elif instruction == "WORKDIR":
            workdir.mkdir(parents=True, exist_ok=True)
        elif instruction == "COPY":
            *sources, _dest = shlex.split(value)
            for source in sources:
                (shutil.copytree if (context / source).is_dir() else shutil.copy2)(context / source, workdir / source)
        elif instruction == "RUN" and value.startswith("uv "):
            done = subprocess.run(shlex.split(value), cwd=workdir, env=env, capture_output=True, text=True,
                                  timeout=600, check=False)
            assert done.returncode == 0, f"{value}: {done.stderr[-2000:]}"
            ran.append(value)
    assert ran == ["uv sync --frozen --no-dev --no-install-project", "uv sync --frozen --no-dev --no-editable"]
    gateway = env_dir / "bin" / "gateway"
    version = subprocess.run([str(gateway), "--version"], capture_output=True, text=True, check=False)
    assert version.returncode == 0 and version.stdout.startswith("gateway ")
    health = subprocess.run([str(gateway), "health", "--target", "127.0.0.1:1", "--timeout", "1"],
                            capture_output=True, text=True, check=False)
    assert health.returncode == 1 and "not healthy" in health.stderr
    # installed as a package, not a link to this checkout; no test, lint or check tool
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    assert (site / "gateway" / "cli.py").is_file() and (site / "gateway" / "demo" / "policies" / "north.yaml").is_file()
    for tool in ("pytest", "ruff", "mypy", "hypothesis", "hadolint", "kubernetes-validate", "check-jsonschema"):
        assert not (env_dir / "bin" / tool).exists(), f"{tool} is in the image"
