"""What the benchmark scripts share: data, a benchmark policy, a site process, tokens, machine facts.

Data comes from ``gateway.demo.synth`` (the demo's generator) and is cached under the work folder
(``bench/work/``, ignored by git). The benchmark policy is the demo's ``north`` policy with one
budget for the projects ``bench*`` large enough for any run and no population cap, written next to
the data; every query goes through the same checks, ledger, audit and noise as in production.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import yaml

from gateway.auth import generate_dev_key, mint_dev_token
from gateway.demo.network import POLICIES
from gateway.demo.synth import synthesize
from gateway.proof import ProofKey

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work"
RESULTS = ROOT / "bench" / "results"
PROJECT = "bench"


def machine() -> dict[str, object]:
    """The machine and the versions a figure depends on."""
    versions = {}
    for name in ("duckdb", "opendp", "polars", "grpcio", "gateway"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": sys.version.split()[0], "cpus": os.cpu_count(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "versions": versions,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def dataset(rows: int, workdir: Path = WORK, site: str = "north", seed: int = 1) -> Path:
    """The synthetic registry of ``rows`` patients for ``site`` (made once, then reused)."""
    path = workdir / "data" / f"{site}-{rows}-{seed}.duckdb"
    if not path.exists():
        synthesize(site, rows, path, seed=seed)
    return path


def bench_policy(data: Path, out: Path, site: str = "north") -> Path:
    """The demo's north policy over ``data``: for projects ``bench*`` a budget no run exhausts, epsilon up to 10."""
    policy = yaml.safe_load((POLICIES / "north.yaml").read_text())
    policy["site"] = site
    policy["epsilon"]["max"] = 10  # room for the benchmark's epsilon and its per-query perturbation
    for ds in policy["datasets"].values():
        ds["source"]["database"] = str(data)
        if "epsilon" in ds:
            ds["epsilon"]["max"] = 10
    policy["budgets"] = [{"project": f"{PROJECT}*", "datasets": ["*"], "epsilon": 100_000_000, "period": "never"}]
    policy.pop("population_caps", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(policy, sort_keys=False))
    return out


@dataclass
class Keys:
    """The development signing key pair and the researcher's proof key of one benchmark run."""

    private: Path
    public: Path
    proof: ProofKey

    def token(self, project: str = PROJECT) -> str:
        """A token for ``project`` (``bench`` or ``bench-...``), bound to :attr:`proof`."""
        return mint_dev_token(self.private.read_bytes(), PROJECT, project, proof_jkt=self.proof.jkt)


def keys(workdir: Path = WORK) -> Keys:
    """Development keys for a benchmark (never for real use)."""
    private, public = generate_dev_key(workdir / "keys")
    return Keys(private, public, ProofKey.generate())


def start_site(policy: Path, public: Path, state: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A real ``gateway site serve`` process over ``policy`` with a fresh ledger: (process, port)."""
    import shutil

    shutil.rmtree(state, ignore_errors=True)  # no stored answer from an earlier run
    state.parent.mkdir(parents=True, exist_ok=True)
    port_file = state.parent / f"{state.name}.port"
    port_file.unlink(missing_ok=True)
    env = {**os.environ, "GATEWAY_LOG_LEVEL": "ERROR"}
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "site", "serve", "--policy", str(policy),
                             "--port", "0", "--state-dir", str(state), "--trusted-key", str(public),
                             "--port-file", str(port_file)], stdout=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 600
    while not port_file.exists() or not port_file.read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the site over {policy} failed to start")
        time.sleep(0.05)
    return proc, int(port_file.read_text())


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 30 s."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def quick(args: argparse.Namespace, parser: argparse.ArgumentParser, **small: object) -> None:
    """``--quick``: the ``small`` values for every option the command line left at its default."""
    for name, value in small.items():
        if getattr(args, name) == parser.get_default(name):
            setattr(args, name, value)


def percentiles(seconds: list[float]) -> dict[str, float]:
    """Median, p95 and p99 in milliseconds."""
    ordered = sorted(seconds)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000

    return {"median_ms": statistics.median(ordered) * 1000, "p95_ms": at(0.95), "p99_ms": at(0.99), "n": len(ordered)}


def write_json(path: Path, payload: dict[str, object]) -> None:
    """``payload`` with the machine facts, as indented JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=str))
    print(f"wrote {path}", flush=True)
