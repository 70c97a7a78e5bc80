"""Validate deploy/ offline, without a Docker engine or a cluster; CI runs it (.ci/run).

- the compose file against the Compose Specification's JSON schema (as shipped by check-jsonschema),
  and that the files, volumes and services it names exist;
- every Kubernetes manifest against the Kubernetes API's JSON schemas (kubernetes-validate, strict:
  unknown fields fail) for each version in KUBERNETES_VERSIONS; that kustomization.yaml lists every
  manifest; that selectors and volume references find what they name;
- the Dockerfile with hadolint, plus what hadolint does not check: several stages, a non-root
  USER, a HEALTHCHECK, every base image with an explicit tag that is not `latest`, the state
  volume, no dev tools installed, COPY sources present;
- the systemd units with `systemd-analyze verify` and `systemd-analyze security --offline`;
- the Prometheus scrape config with `promtool check config`;
- every `gateway` command line in these files (compose, the init script, the Dockerfile,
  Kubernetes args and probes, systemd ExecStart) with the real argparse parser;
- the configuration embedded in them (the broker configs, the Kubernetes policy) with the real
  loaders, and the server settings: the examples in deploy/config and each compose service's as it
  starts (its config file, environment and flags together); and that no private key or
  certificate is committed under deploy/.

Prints one line per problem (``file: what``) and exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")  # the oldest supported here and the newest the schemas know
SYSTEMD_EXPOSURE_LIMIT = 20  # systemd-analyze security's --threshold, tenths of its 0-10 exposure: 2.0
INSTALLED_GATEWAY = "/opt/gateway/bin/gateway"  # where the units expect the command (see their comments)


@dataclass(frozen=True)
class CommandLine:
    """One `gateway` command line found in a deploy file: where, and its arguments after `gateway`."""

    where: str
    argv: tuple[str, ...]


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def load_yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


# -- compose -------------------------------------------------------------------------------------

def compose_schema() -> dict[str, Any]:
    """The Compose Specification's schema as check-jsonschema vendors it (its source and license are there)."""
    text = (resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text()
    return dict(json.loads(text))


def check_compose(path: Path) -> list[str]:
    import jsonschema

    try:
        compose = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        return [f"{rel(path)}: not YAML: {err}"]
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    problems = [f"{rel(path)}: {'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
                for e in sorted(validator.iter_errors(compose), key=lambda e: list(map(str, e.absolute_path)))]
    if problems:
        return problems
    return problems + _compose_references(path, compose)


def _compose_references(path: Path, compose: dict[str, Any]) -> list[str]:
    """What the schema cannot see: files, named volumes, configs and services that must exist."""
    problems = []
    base = path.parent
    services = compose.get("services", {})
    for name, config in compose.get("configs", {}).items():
        if "file" in config and not (base / config["file"]).is_file():
            problems.append(f"{rel(path)}: configs/{name}: no file {config['file']}")
    volumes = set(compose.get("volumes", {}) or {})
    for name, service in services.items():
        for mount in service.get("volumes", []):
            source = (mount.split(":")[0] if isinstance(mount, str) else mount.get("source", ""))
            if source.startswith((".", "/")):
                if not (base / source).exists():
                    problems.append(f"{rel(path)}: services/{name}/volumes: no {source}")
            elif source and source not in volumes:
                problems.append(f"{rel(path)}: services/{name}/volumes: volume {source} is not declared")
        for config in service.get("configs", []):
            source = config if isinstance(config, str) else config["source"]
            if source not in compose.get("configs", {}):
                problems.append(f"{rel(path)}: services/{name}/configs: config {source} is not declared")
        depends = service.get("depends_on", [])
        for other in (depends if isinstance(depends, list) else depends.keys()):
            if other not in services:
                problems.append(f"{rel(path)}: services/{name}/depends_on: no service {other}")
    return problems


def compose_command_lines(path: Path) -> Iterator[CommandLine]:
    compose = yaml.safe_load(path.read_text())
    for name, service in compose.get("services", {}).items():
        if not _runs_gateway(service.get("image", ""), service.get("entrypoint")):
            continue
        command = service.get("command")
        if command is not None:
            yield CommandLine(f"{rel(path)}: services/{name}/command",
                              tuple(shlex.split(command) if isinstance(command, str) else map(str, command)))
        test = service.get("healthcheck", {}).get("test")
        if isinstance(test, list) and test[:2] in (["CMD", "gateway"], ["CMD-SHELL", "gateway"]):
            yield CommandLine(f"{rel(path)}: services/{name}/healthcheck", tuple(test[2:]))


def _runs_gateway(image: str, entrypoint: Any) -> bool:
    """A service of the gateway image whose entry point is the image's own (`gateway`)."""
    return image.split(":", maxsplit=1)[0].rsplit("/", 1)[-1] == "gateway" and entrypoint is None


# -- shell scripts -------------------------------------------------------------------------------

_SHELL_DEFAULT = re.compile(r"\$\{(\w+):-([^}]*)\}")
_SHELL_VARIABLE = re.compile(r"\$\{?(\w+)\}?")


def shell_command_lines(path: Path) -> Iterator[CommandLine]:
    """`gateway ...` simple commands of a POSIX shell script; ${X:-default} stands for its default."""
    for number, text in _logical_lines(path.read_text()):
        line = _SHELL_VARIABLE.sub(lambda m: m.group(1), _SHELL_DEFAULT.sub(lambda m: m.group(2), text))
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")  # '#' starts a comment
        lexer.whitespace_split = True
        words: list[str] = []
        for token in [*lexer, ";"]:
            if token and set(token) <= set(";&|"):
                if words and words[0] == "gateway":
                    yield CommandLine(f"{rel(path)}:{number}", tuple(words[1:]))
                words = []
            else:
                words.append(token)


# -- Dockerfile ----------------------------------------------------------------------------------

def check_dockerfile(path: Path) -> list[str]:
    from dockerfile_parse import DockerfileParser

    problems = _run_tool([_tool("hadolint"), "--no-color", str(path)], path)
    parser = DockerfileParser(str(path))
    stages: list[list[dict[str, Any]]] = []
    for item in parser.structure:
        if item["instruction"] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(item)
    if len(stages) < 2:
        problems.append(f"{rel(path)}: one stage: build in one stage and copy only the environment into the image")
    for image in parser.parent_images:
        name, _, digest = image.partition("@")
        tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else ""
        if not digest and (not tag or tag == "latest" or not re.search(r"\d", tag)):
            problems.append(f"{rel(path)}: FROM {image}: pin the base image to a version tag (or a digest)")
    final = {item["instruction"]: item["value"] for item in stages[-1]} if stages else {}
    return problems + _final_stage_rules(path, final) + _dockerfile_steps(path, parser.structure)


def _final_stage_rules(path: Path, final: dict[str, str]) -> list[str]:
    problems = []
    user = final.get("USER", "root").split(":")[0]
    if user in ("root", "0"):
        problems.append(f"{rel(path)}: the image runs as root: end with USER and a non-root user")
    if "HEALTHCHECK" not in final or final["HEALTHCHECK"].strip().upper() == "NONE":
        problems.append(f"{rel(path)}: no HEALTHCHECK in the final stage")
    if "/var/lib/gateway" not in final.get("VOLUME", ""):
        problems.append(f"{rel(path)}: the state dir /var/lib/gateway is not a VOLUME")
    return problems


def _dockerfile_steps(path: Path, structure: list[dict[str, Any]]) -> list[str]:
    problems = []
    for item in structure:
        value = item["value"]
        if item["instruction"] == "RUN" and re.search(r"--group[= ]dev|--all-groups|--extra[= ]dev", value):
            problems.append(f"{rel(path)}:{item['startline'] + 1}: installs the dev tools")
        if item["instruction"] in ("COPY", "ADD") and "--from" not in value:
            for source in shlex.split(value)[:-1]:
                if not source.startswith("--") and not (ROOT / source).exists():
                    problems.append(f"{rel(path)}:{item['startline'] + 1}: COPY of {source}, which is not in the "
                                    "build context (the repository root)")
    return problems


def dockerfile_command_lines(path: Path) -> Iterator[CommandLine]:
    from dockerfile_parse import DockerfileParser

    entrypoint: list[str] = []
    for item in DockerfileParser(str(path)).structure:
        kind, value = item["instruction"], item["value"]
        where = f"{rel(path)}:{item['startline'] + 1}"
        if kind == "ENTRYPOINT":
            entrypoint = _exec_form(value)
        elif kind == "CMD" and entrypoint == ["gateway"]:
            yield CommandLine(where, tuple(_exec_form(value)))
        elif kind == "HEALTHCHECK" and " CMD " in f" {value} ":
            command = _exec_form(value.split("CMD", 1)[1].strip())
            if command[:1] == ["gateway"]:
                yield CommandLine(where, tuple(command[1:]))


def _exec_form(value: str) -> list[str]:
    value = value.strip()
    return [str(v) for v in json.loads(value)] if value.startswith("[") else shlex.split(value)


# -- Kubernetes ----------------------------------------------------------------------------------

KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "labels", "commonLabels", "commonAnnotations", "images",
                      "namespace", "namePrefix", "nameSuffix", "configMapGenerator", "secretGenerator",
                      "patches", "replicas", "components", "generatorOptions"}


def check_kubernetes(folder: Path, versions: tuple[str, ...] = KUBERNETES_VERSIONS) -> list[str]:
    import kubernetes_validate

    problems = []
    kustomization = folder / "kustomization.yaml"
    manifests = sorted(p for p in folder.glob("*.yaml") if p.name != kustomization.name)
    resources_by_kind: dict[str, list[dict[str, Any]]] = {}
    for path in manifests:
        try:
            documents = load_yaml_documents(path)
        except yaml.YAMLError as err:
            problems.append(f"{rel(path)}: not YAML: {err}")
            continue
        for doc in documents:
            resources_by_kind.setdefault(str(doc.get("kind")), []).append(doc)
            for version in versions:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as err:
                    where = ".".join(str(p) for p in err.path) or "(top)"
                    problems.append(f"{rel(path)}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')} "
                                    f"(Kubernetes {version}): {where}: {err.message}")
                    break
                except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as err:
                    problems.append(f"{rel(path)}: no schema for {doc.get('apiVersion')} {doc.get('kind')} "
                                    f"(Kubernetes {version}): {err}")
                    break
    problems += _check_kustomization(kustomization, manifests)
    return problems + _kubernetes_references(folder, resources_by_kind)


def _check_kustomization(path: Path, manifests: list[Path]) -> list[str]:
    if not path.is_file():
        return [f"{rel(path)}: missing"]
    kustomization = yaml.safe_load(path.read_text())
    problems = [f"{rel(path)}: unknown field {key}" for key in sorted(set(kustomization) - KUSTOMIZATION_KEYS)]
    if kustomization.get("kind") != "Kustomization":
        problems.append(f"{rel(path)}: kind must be Kustomization")
    listed = kustomization.get("resources", [])
    problems += [f"{rel(path)}: resources: no file {name}" for name in listed if not (path.parent / name).is_file()]
    problems += [f"{rel(path)}: resources: {name} listed twice" for name in sorted(set(listed))
                 if listed.count(name) > 1]
    problems += [f"{rel(path)}: resources: {p.name} is not listed" for p in manifests if p.name not in listed]
    return problems


def _kubernetes_references(folder: Path, by_kind: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Selectors that select a workload, and volumes whose ConfigMap, Secret or claim is in the base."""
    problems = []
    workloads = [d for kind in ("StatefulSet", "Deployment") for d in by_kind.get(kind, [])]
    pod_labels = [d["spec"]["template"]["metadata"].get("labels", {}) for d in workloads]

    def selects(selector: dict[str, str]) -> bool:
        return any(selector.items() <= labels.items() for labels in pod_labels)

    for service in by_kind.get("Service", []):
        if not selects(service["spec"].get("selector", {})):
            problems.append(f"{rel(folder)}: Service/{service['metadata']['name']}: its selector matches no pod")
    for policy in by_kind.get("NetworkPolicy", []):
        name = policy["metadata"]["name"]
        if not selects(policy["spec"]["podSelector"].get("matchLabels", {})):
            problems.append(f"{rel(folder)}: NetworkPolicy/{name}: podSelector matches no pod")
        for rule in policy["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                labels = peer.get("podSelector", {}).get("matchLabels")
                if labels and "namespaceSelector" not in peer and not selects(labels):
                    problems.append(f"{rel(folder)}: NetworkPolicy/{name}: ingress from {labels}: no such pod")
    return problems + _volume_references(folder, workloads, by_kind)


def _volume_references(folder: Path, workloads: list[dict[str, Any]],
                       by_kind: dict[str, list[dict[str, Any]]]) -> list[str]:
    problems = []
    names = {kind: {d["metadata"]["name"] for d in docs} for kind, docs in by_kind.items()}
    for workload in workloads:
        spec = workload["spec"]
        claims = {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])}
        pod = spec["template"]["spec"]
        volumes = {v["name"] for v in pod.get("volumes", [])} | claims
        kind_name = f"{workload['kind']}/{workload['metadata']['name']}"
        for volume in pod.get("volumes", []):
            for key, kind, field in (("configMap", "ConfigMap", "name"), ("secret", "Secret", "secretName"),
                                     ("persistentVolumeClaim", "PersistentVolumeClaim", "claimName")):
                if key in volume and volume[key][field] not in names.get(kind, set()):
                    problems.append(f"{rel(folder)}: {kind_name}: volume {volume['name']}: no {kind} "
                                    f"{volume[key][field]} in the base")
        for container in pod["containers"]:
            for mount in container.get("volumeMounts", []):
                if mount["name"] not in volumes:
                    problems.append(f"{rel(folder)}: {kind_name}: mount of undeclared volume {mount['name']}")
    return problems


def kubernetes_command_lines(folder: Path) -> Iterator[CommandLine]:
    for path in sorted(folder.glob("*.yaml")):
        for doc in load_yaml_documents(path):
            if doc.get("kind") not in ("StatefulSet", "Deployment"):
                continue
            for container in doc["spec"]["template"]["spec"]["containers"]:
                where = f"{rel(path)}: {doc['kind']}/{doc['metadata']['name']}/{container['name']}"
                if _runs_gateway(container.get("image", ""), container.get("command")):
                    yield CommandLine(f"{where}/args", tuple(map(str, container.get("args", []))))
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    command = container.get(probe, {}).get("exec", {}).get("command", [])
                    if command[:1] == ["gateway"]:
                        yield CommandLine(f"{where}/{probe}", tuple(command[1:]))


def embedded_configs(folder: Path) -> Iterator[tuple[str, str, str]]:
    """(where, key, text) of each file held in a ConfigMap of the base."""
    for path in sorted(folder.glob("*.yaml")):
        for doc in load_yaml_documents(path):
            if doc.get("kind") == "ConfigMap":
                for key, text in doc.get("data", {}).items():
                    yield f"{rel(path)}: ConfigMap/{doc['metadata']['name']}/{key}", key, text


def check_embedded_configs(folder: Path, compose_broker: Path) -> list[str]:
    """The broker configs and the Kubernetes policy load with the gateway's own loaders."""
    from gateway.broker.config import BrokerConfigError, load_broker_config
    from gateway.policy import PolicyFileError, load_policy

    problems = []
    try:
        load_broker_config(compose_broker)
    except BrokerConfigError as err:
        problems += err.problems
    with tempfile.TemporaryDirectory() as tmp:
        for where, key, text in embedded_configs(folder):
            copy = Path(tmp) / key
            copy.write_text(text)
            try:
                if key == "broker.yaml":
                    load_broker_config(copy)
                elif key == "policy.yaml":
                    load_policy(copy)
                else:
                    problems.append(f"{where}: not a file the gateway reads (policy.yaml or broker.yaml)")
            except (BrokerConfigError, PolicyFileError) as err:
                # file:line: field: reason, its line counted within the embedded file
                problems += [where + line.removeprefix(str(copy)) for line in err.problems]
    return problems


def check_server_settings(deploy: Path) -> list[str]:
    """The example settings files, and every compose service's settings as it starts (file, environment
    and flags together), load with the gateway's own loader."""
    from gateway._yamlfile import ConfigFileError
    from gateway.broker.config import load_broker_settings
    from gateway.cli import _parser
    from gateway.site.settings import load_site_settings

    loaders = {"site": load_site_settings, "broker": load_broker_settings}
    problems: list[str] = []

    def load(where: str, component: str, file: Path, env: dict[str, str], flags: dict[str, Any]) -> None:
        try:
            loaders[component](file, env, flags)
        except ConfigFileError as err:
            problems.extend(f"{where}: {line}" for line in err.problems)

    for component in loaders:
        example = deploy / "config" / f"{component}.yaml"
        load(rel(example), component, example, {}, {})
    compose_path = deploy / "compose.yaml"
    compose = yaml.safe_load(compose_path.read_text())
    for name, service in compose.get("services", {}).items():
        command = [str(c) for c in service.get("command") or []]
        if command[1:2] != ["serve"] or command[:1] not in (["site"], ["broker"]):
            continue
        args = vars(_parser().parse_args(command))
        targets = {c["target"]: compose["configs"][c["source"]]["file"] for c in service.get("configs", [])}
        if args.get("config") is None or str(args["config"]) not in targets:
            problems.append(f"{rel(compose_path)}: services/{name}: no config file mounted at {args.get('config')}")
            continue
        file = compose_path.parent / targets[str(args["config"])]
        env = {str(k): str(v) for k, v in (service.get("environment") or {}).items()}
        model_fields = _settings_model(command[0]).model_fields
        load(f"{rel(compose_path)}: services/{name}", command[0], file, env,
             {k: v for k, v in args.items() if k in model_fields})
    return problems


def _settings_model(component: str) -> Any:
    from gateway.broker.config import BrokerConfig
    from gateway.site.settings import SiteSettings

    return SiteSettings if component == "site" else BrokerConfig


# -- systemd -------------------------------------------------------------------------------------

def check_systemd(folder: Path) -> list[str]:
    """`systemd-analyze verify` and `security --offline` on copies whose ExecStart names this checkout's gateway.

    verify checks that the command exists; the units name where a VM installs it
    (/opt/gateway/bin/gateway), so the copies name the `gateway` of this environment instead.
    A template unit is checked as an instance (NAME@example.service).
    """
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return [f"{rel(folder)}: systemd-analyze not found (Debian: apt-get install systemd): units not verified"]
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        units = []
        for unit in sorted(folder.glob("*.service")):
            text = unit.read_text().replace(INSTALLED_GATEWAY, _tool("gateway"))
            (Path(tmp) / unit.name).write_text(text)
            name = unit.name.replace("@.service", "@example.service")
            if name != unit.name:
                (Path(tmp) / name).symlink_to(unit.name)
            units.append(str(Path(tmp) / name))
        if not units:
            return [f"{rel(folder)}: no unit"]
        problems += _run_tool([analyze, "verify", *units], folder, tmp)
        for unit in units:
            problems += _security(analyze, unit, folder)
    return problems


def _security(analyze: str, unit: str, folder: Path) -> list[str]:
    """The unit's exposure when it is over the limit (`systemd-analyze security` lists what is missing)."""
    done = subprocess.run([analyze, "security", "--offline=yes", f"--threshold={SYSTEMD_EXPOSURE_LIMIT}",
                           "--no-pager", unit], capture_output=True, text=True, timeout=120, check=False)
    if done.returncode == 0:
        return []
    lines = [" ".join(line.split()).removeprefix("→ ") for line in done.stdout.splitlines()
             if "Overall exposure" in line] or [done.stderr.strip()]
    return [f"{rel(folder)}: systemd-analyze security: {line} (the limit is {SYSTEMD_EXPOSURE_LIMIT / 10:.1f}; "
            "`systemd-analyze security --offline=yes UNIT` lists the settings missing)" for line in lines]


def systemd_command_lines(folder: Path) -> Iterator[CommandLine]:
    for unit in sorted(folder.glob("*.service")):
        for number, line in _logical_lines(unit.read_text()):
            key, sep, value = line.partition("=")
            if sep and key.strip() in ("ExecStart", "ExecStartPre", "ExecStartPost", "ExecReload"):
                argv = shlex.split(value.strip().lstrip("-@+!:").replace("%i", "example").replace("%%", "%"))
                if argv[:1] == [INSTALLED_GATEWAY]:
                    yield CommandLine(f"{rel(unit)}:{number}", tuple(argv[1:]))


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(number of its first line, line) with backslash continuations joined."""
    start, parts = 0, []
    for number, line in enumerate(text.splitlines(), 1):
        start = start or number
        parts.append(line.removesuffix("\\"))
        if not line.endswith("\\"):
            yield start, " ".join(parts)
            start, parts = 0, []


# -- Prometheus ----------------------------------------------------------------------------------

def check_prometheus(config: Path) -> list[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        return [f"{rel(config)}: promtool not found (Debian: apt-get install prometheus): not checked"]
    return _run_tool([promtool, "check", "config", str(config)], config, quiet_ok=True)


# -- command lines and secrets -------------------------------------------------------------------

def all_command_lines() -> list[CommandLine]:
    return [*compose_command_lines(DEPLOY / "compose.yaml"),
            *shell_command_lines(DEPLOY / "compose" / "init-dev.sh"),
            *dockerfile_command_lines(DEPLOY / "Dockerfile"),
            *kubernetes_command_lines(DEPLOY / "k8s" / "base"),
            *systemd_command_lines(DEPLOY / "systemd")]


def check_command_lines(lines: list[CommandLine]) -> list[str]:
    """Each line parses with the gateway's own argparse parser (a misspelt or removed flag fails)."""
    from gateway.cli import _parser

    problems = []
    for line in lines:
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
                _parser().parse_args(list(line.argv))
        except SystemExit as exit_:
            if exit_.code not in (0, None):  # --help and --version exit 0
                message = errors.getvalue().strip().splitlines()[-1] if errors.getvalue().strip() else "rejected"
                problems.append(f"{line.where}: gateway {shlex.join(line.argv)}: {message}")
    return problems


_PEM = re.compile(r"-----BEGIN [A-Z0-9 ]*(PRIVATE KEY|CERTIFICATE)-----")


def check_no_key_material(folder: Path) -> list[str]:
    return [f"{rel(p)}: holds a PEM {m.group(1).lower()}: commit placeholders, never keys or certificates"
            for p in sorted(folder.rglob("*")) if p.is_file()
            for m in [_PEM.search(p.read_text(errors="replace"))] if m]


# -- plumbing ------------------------------------------------------------------------------------

def _tool(name: str) -> str:
    """A tool of this environment (the dev group installs hadolint, and gateway itself, beside python)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def _run_tool(argv: list[str], subject: Path, tmp: str | None = None, quiet_ok: bool = False) -> list[str]:
    """Problems from a tool: every line it prints (or, with ``quiet_ok``, its output when it fails)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    except FileNotFoundError:
        return [f"{rel(subject)}: {Path(argv[0]).name} not found: not checked"]
    output = (done.stdout + done.stderr).strip()
    if tmp:
        output = output.replace(tmp + "/", "")
    if (quiet_ok and done.returncode == 0) or (not quiet_ok and not output and done.returncode == 0):
        return []
    lines = [line for line in output.splitlines() if line.strip()][-15:] or [f"exit status {done.returncode}"]
    return [f"{rel(subject)}: {Path(argv[0]).name}: {line}" for line in lines]


def run_all() -> dict[str, list[str]]:
    """Every check by name, with its problems."""
    lines = all_command_lines()
    return {
        "compose file against the Compose Specification schema": check_compose(DEPLOY / "compose.yaml"),
        "Kubernetes manifests against the Kubernetes schemas "
        f"({', '.join(KUBERNETES_VERSIONS)}), kustomization, references": check_kubernetes(DEPLOY / "k8s" / "base"),
        "Dockerfile (hadolint and image rules)": check_dockerfile(DEPLOY / "Dockerfile"),
        "systemd units (systemd-analyze verify, security)": check_systemd(DEPLOY / "systemd"),
        "Prometheus config (promtool)": check_prometheus(DEPLOY / "prometheus" / "prometheus.yml"),
        f"{len(lines)} gateway command lines against the real parser": check_command_lines(lines),
        "broker configs and policy with the gateway's loaders":
            check_embedded_configs(DEPLOY / "k8s" / "base", DEPLOY / "compose" / "broker.yaml"),
        "server settings (deploy/config, each compose service's) with the gateway's loader":
            check_server_settings(DEPLOY),
        "no key or certificate committed": check_no_key_material(DEPLOY),
    }


def main() -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    failed = False
    for name, problems in run_all().items():
        print(f"{'FAIL' if problems else 'ok  '} {name}")
        for problem in problems:
            print(f"     {problem}")
        failed = failed or bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
