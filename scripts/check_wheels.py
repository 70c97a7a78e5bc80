"""Check the two wheels built from this repository: `gateway` (everything) and `gateway-client`.

Run ``python scripts/check_wheels.py DIST_DIR`` on a folder holding both wheels (CI builds them with
``uv build``). It fails when the client wheel ships a file that is not one of the client modules
listed in ``clients/python/pyproject.toml`` (so no server module can slip in), lacks a module every
client needs, ships a file that differs from the full wheel's, depends on anything beyond the
client's own dependencies, holds a module that imports a server-side library (DuckDB, OpenDP,
pydantic, ...), when either wheel's version is not the one in ``gateway/_version.py`` or it
carries no license, or when clients/python/LICENSE is not a copy of LICENSE. ``--strict-imports``
also fails when a shipped module imports a `gateway` module the client wheel does not ship
(without it, those imports are listed as a note).
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLIENT_PYPROJECT = ROOT / "clients" / "python" / "pyproject.toml"
PACKAGE = "gateway"
# Every client needs these; the rest of the listed modules may come and go with the package layout.
REQUIRED = ("__init__.py", "_version.py", "py.typed", "client.py", "errors.py",
            "_proto/gateway/v1/gateway_pb2.py", "_proto/gateway/v1/gateway_pb2_grpc.py")
CLIENT_DEPENDENCIES = {"grpcio", "grpcio-status", "protobuf", "polars", "pyjwt", "numpy",
                       "matplotlib", "pandas", "pyarrow"}  # only with the `plot` and `pandas` extras
# What those dependencies are imported as. A shipped module importing anything else (duckdb, opendp,
# pydantic, yaml, ...) is a server module, whatever its name. PyJWT and cryptography sign proofs;
# gateway/plot.py imports matplotlib when a picture is drawn; gateway/regression.py (a regression's fit,
# named by the table of aggregate kinds) numpy.
CLIENT_IMPORTS = {"grpc", "grpc_status", "google", "polars", "jwt", "cryptography", "matplotlib", "pandas", "pyarrow",
                  "numpy", PACKAGE}


def _one(dist: Path, pattern: str) -> Path:
    found = sorted(dist.glob(pattern))
    if len(found) != 1:
        sys.exit(f"check_wheels: expected one {pattern} in {dist}, found {[p.name for p in found]}")
    return found[0]


def _metadata(wheel: zipfile.ZipFile) -> tuple[str, list[str], list[str]]:
    name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    meta = Parser().parsestr(wheel.read(name).decode())
    requires = [re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0].lower().replace("_", "-")
                for r in meta.get_all("Requires-Dist") or []]
    licenses = [n for n in wheel.namelist() if ".dist-info/licenses/" in n]
    return meta["Version"], requires, licenses


def _matches(path: str, pattern: str) -> bool:
    """``Path.glob`` semantics for one relative path: ``**/`` spans folders, ``*`` stays within one."""
    regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*")
    return re.fullmatch(regex, path) is not None


def _module_of(path: str) -> str:
    dotted = path.removesuffix(".py").replace("/", ".")
    return dotted.removesuffix(".__init__")


def _run_time_nodes(source: bytes, name: str) -> list[ast.AST]:
    """Every node of a module except those under ``if TYPE_CHECKING:`` (imports for type checking only)."""
    tree = ast.parse(source, name)
    for node in ast.walk(tree):
        for field in ("body", "orelse"):
            block = getattr(node, field, None)
            if isinstance(block, list):
                setattr(node, field, [n for n in block if not _is_type_checking(n)])
    return list(ast.walk(tree))


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _foreign_imports(wheel: zipfile.ZipFile, shipped: set[str]) -> list[str]:
    """``file: module`` for every absolute import of neither the standard library nor a client dependency."""
    found = []
    for name in sorted(n for n in shipped if n.endswith(".py")):
        for node in _run_time_nodes(wheel.read(name), name):
            if isinstance(node, ast.Import):
                tops = [a.name.partition(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.partition(".")[0]]
            else:
                continue
            found += [f"{name}: {t}" for t in tops if t not in sys.stdlib_module_names and t not in CLIENT_IMPORTS]
    return sorted(set(found))


def _unshipped_imports(wheel: zipfile.ZipFile, shipped: set[str]) -> list[str]:
    """``file: module`` for every import of a `gateway` module that the wheel does not ship."""
    modules = {_module_of(n) for n in shipped if n.endswith(".py")}
    missing = []
    for name in sorted(n for n in shipped if n.endswith(".py")):
        package = _module_of(name) if name.endswith("__init__.py") else _module_of(name).rpartition(".")[0]
        for node in _run_time_nodes(wheel.read(name), name):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                stem = ".".join([*base, *([node.module] if node.module else [])])
                # `from .x import y` may name a submodule y or an attribute of x: accept either.
                targets = [stem if f"{stem}.{a.name}" not in modules else f"{stem}.{a.name}" for a in node.names]
            missing += [f"{name}: {t}" for t in targets
                        if (t == PACKAGE or t.startswith(PACKAGE + ".")) and t not in modules]
    return sorted(set(missing))


def _check_files(full: zipfile.ZipFile, client: zipfile.ZipFile, shipped: set[str], patterns: list[str]) -> list[str]:
    """The client wheel's files: all in the package, listed, and the same as the full wheel's."""
    problems = [f"gateway-client ships {n}, outside the {PACKAGE} package"
                for n in client.namelist() if n not in shipped and ".dist-info/" not in n]
    for name in sorted(shipped):
        if not any(_matches(name.removeprefix(PACKAGE + "/"), p) for p in patterns):
            problems.append(f"gateway-client ships {name}, which is not a listed client module")
        elif name not in full.namelist():
            problems.append(f"gateway-client ships {name}, which the full gateway wheel does not have")
        elif client.read(name) != full.read(name):
            problems.append(f"gateway-client's {name} differs from the full gateway wheel's")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dist", type=Path, help="folder holding the gateway and gateway-client wheels")
    parser.add_argument("--strict-imports", action="store_true",
                        help="fail when a shipped module imports a gateway module the client wheel lacks")
    args = parser.parse_args()

    version_text = (ROOT / PACKAGE / "_version.py").read_text()
    match = re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", version_text, re.MULTILINE)
    assert match is not None, "gateway/_version.py has no __version__"
    version = match.group(1)
    patterns = tomllib.loads(CLIENT_PYPROJECT.read_text())["tool"]["hatch"]["build"]["hooks"]["custom"]["modules"]
    problems: list[str] = []
    if (ROOT / "clients" / "python" / "LICENSE").read_bytes() != (ROOT / "LICENSE").read_bytes():
        problems.append("clients/python/LICENSE is not a copy of LICENSE")

    with zipfile.ZipFile(_one(args.dist, "gateway-*.whl")) as full, \
            zipfile.ZipFile(_one(args.dist, "gateway_client-*.whl")) as client:
        for label, wheel in (("gateway", full), ("gateway-client", client)):
            wheel_version, _, licenses = _metadata(wheel)
            if wheel_version != version:
                problems.append(f"{label} wheel has version {wheel_version}, gateway/_version.py says {version}")
            if not licenses:
                problems.append(f"{label} wheel carries no license file")

        _, requires, _ = _metadata(client)
        problems += [f"gateway-client depends on {r}, which is not a client dependency"
                     for r in requires if r not in CLIENT_DEPENDENCIES]

        shipped = {n for n in client.namelist() if n.startswith(PACKAGE + "/")}
        problems += _check_files(full, client, shipped, patterns)
        problems += [f"gateway-client lacks {PACKAGE}/{r}" for r in REQUIRED if f"{PACKAGE}/{r}" not in shipped]
        problems += [f"gateway-client ships a server module: {f}" for f in _foreign_imports(client, shipped)]

        unshipped = _unshipped_imports(client, shipped)
        print(f"gateway-client {version}: {len(shipped)} files: "
              + ", ".join(sorted(n.removeprefix(PACKAGE + "/") for n in shipped if "/_proto/" not in n)) + ", _proto/")
        if unshipped:
            lines = "\n  ".join(unshipped)
            if args.strict_imports:
                problems.append(f"gateway-client's modules import gateway modules it does not ship:\n  {lines}")
            else:
                print(f"note: gateway-client's modules import gateway modules it does not ship:\n  {lines}")

    for problem in problems:
        print(f"check_wheels: {problem}", file=sys.stderr)
    if not problems:
        print("check_wheels: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
