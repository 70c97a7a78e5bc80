"""The offline checks of deploy/ (scripts/check_deploy.py): the shipped files pass, and each check
fails on an error planted in a copy of them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from scripts import check_deploy as check

ROOT = Path(__file__).resolve().parents[2]
needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed "
                                   "(Debian: apt-get install systemd)")
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed "
                                    "(Debian: apt-get install prometheus)")


@pytest.fixture
def deploy(tmp_path):
    """A copy of deploy/ beside the policies it names, to plant errors in."""
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy")
    (tmp_path / "policies").symlink_to(ROOT / "policies")
    return tmp_path / "deploy"


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


# -- the shipped files --------------------------------------------------------------------------

def test_shipped_compose_manifests_dockerfile_configs_and_command_lines_pass():
    assert check.check_compose(ROOT / "deploy" / "compose.yaml") == []
    assert check.check_kubernetes(ROOT / "deploy" / "k8s" / "base") == []
    assert check.check_dockerfile(ROOT / "deploy" / "Dockerfile") == []
    assert check.check_embedded_configs(ROOT / "deploy" / "k8s" / "base",
                                        ROOT / "deploy" / "compose" / "broker.yaml") == []
    assert check.check_no_key_material(ROOT / "deploy") == []
    assert check.check_command_lines(check.all_command_lines()) == []
    assert check.check_server_settings(ROOT / "deploy") == []


@needs_systemd
def test_shipped_systemd_units_pass_verify_and_security():
    assert check.check_systemd(ROOT / "deploy" / "systemd") == []


@needs_promtool
def test_shipped_prometheus_config_passes_promtool():
    assert check.check_prometheus(ROOT / "deploy" / "prometheus" / "prometheus.yml") == []


def test_command_lines_are_found_in_every_kind_of_file():
    lines = check.all_command_lines()
    sources = {line.where.split(":")[0] for line in lines}
    assert sources == {"deploy/compose.yaml", "deploy/compose/init-dev.sh", "deploy/Dockerfile",
                       "deploy/k8s/base/site-statefulset.yaml", "deploy/k8s/base/broker-deployment.yaml",
                       "deploy/systemd/gateway-site@.service", "deploy/systemd/gateway-broker.service"}
    commands = [line.argv[:2] for line in lines]
    assert commands.count(("site", "serve")) == 6  # four compose sites, the StatefulSet, the unit
    assert commands.count(("broker", "serve")) == 3
    assert ("certs", "dev") in commands and ("data", "synth") in commands and ("token", "keygen") in commands
    assert commands.count(("health",)) == 6  # the image's health check and five Kubernetes probes
    synth = next(line.argv for line in lines if line.argv[:2] == ("data", "synth"))
    assert synth[synth.index("--patients") + 1] == "20000"  # ${PATIENTS:-20000} stands for its default


# -- planted errors -----------------------------------------------------------------------------

def test_a_misspelt_or_removed_flag_fails_the_real_parser():
    lines = [check.CommandLine("a", ("site", "serve", "--policy", "p.yaml", "--metric-port", "9464")),
             check.CommandLine("b", ("broker", "serve", "--config", "b.yaml", "--policy", "p.yaml")),
             check.CommandLine("c", ("site", "serve", "--policy", "p.yaml", "--port", "$(PORT)")),
             check.CommandLine("d", ("--version",))]
    problems = check.check_command_lines(lines)
    assert len(problems) == 3
    assert problems[0].startswith("a: gateway site serve") and "--metric-port" in problems[0]
    assert problems[1].startswith("b: ") and "--policy" in problems[1]  # a site's flag
    assert problems[2].startswith("c: ") and "invalid int value" in problems[2]


def test_compose_schema_rejects_an_unknown_service_field_and_a_wrong_type(deploy):
    edit(deploy / "compose.yaml", "    restart: unless-stopped\n    command: [--config.file",
         "    restart: unless-stopped\n    restart_policy: always\n    command: [--config.file")
    edit(deploy / "compose.yaml", 'cap_drop: [ALL]\n    cap_add:', 'cap_drop: ALL\n    cap_add:')
    problems = check.check_compose(deploy / "compose.yaml")
    assert any("services/prometheus" in p and "restart_policy" in p for p in problems), problems
    assert any("services/init/cap_drop" in p for p in problems), problems


def test_compose_references_must_exist(deploy):
    edit(deploy / "compose.yaml", "file: ./compose/broker.yaml", "file: ./compose/brokers.yaml")
    edit(deploy / "compose.yaml", "- north-state:/var/lib/gateway", "- nort-state:/var/lib/gateway")
    problems = check.check_compose(deploy / "compose.yaml")
    assert any("configs/broker-config: no file ./compose/brokers.yaml" in p for p in problems), problems
    assert any("volume nort-state is not declared" in p for p in problems), problems


def test_kubernetes_schemas_reject_an_unknown_field_and_a_wrong_type(deploy):
    base = deploy / "k8s" / "base"
    edit(base / "site-statefulset.yaml", "  serviceName: gateway-site\n", "  serviceName: gateway-site\n  replica: 1\n")
    edit(base / "broker-deployment.yaml", "periodSeconds: 30", "periodSeconds: thirty")
    problems = check.check_kubernetes(base)
    assert any("StatefulSet/gateway-site" in p and "'replica' was unexpected" in p for p in problems), problems
    assert any("Deployment/gateway-broker" in p and "livenessProbe.periodSeconds" in p for p in problems), problems


def test_kubernetes_grpc_probe_fields_are_checked_too(deploy):
    """A misspelt probe field of any kind fails (here the built-in gRPC probe, which the base does not use)."""
    base = deploy / "k8s" / "base"
    probe = "          livenessProbe:\n            "
    edit(base / "site-statefulset.yaml", probe + "exec:\n              command: [gateway, health]",
         probe + "grpc:\n              port: 50051\n              servce: gateway")
    problems = check.check_kubernetes(base)
    assert any("livenessProbe.grpc" in p and "'servce' was unexpected" in p for p in problems), problems


def test_kustomization_must_list_every_manifest_and_only_existing_ones(deploy):
    base = deploy / "k8s" / "base"
    (base / "extra-configmap.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: extra\n")
    (base / "site-data-pvc.yaml").unlink()
    problems = check.check_kubernetes(base)
    assert any("extra-configmap.yaml is not listed" in p for p in problems), problems
    assert any("resources: no file site-data-pvc.yaml" in p for p in problems), problems
    # and the StatefulSet's claim is now missing from the base
    assert any("no PersistentVolumeClaim gateway-site-data" in p for p in problems), problems


def test_network_policy_and_service_selectors_must_select_the_pods(deploy):
    base = deploy / "k8s" / "base"
    edit(base / "site-networkpolicy.yaml", "app.kubernetes.io/name: gateway-broker", "app.kubernetes.io/name: broker")
    edit(base / "broker-service.yaml", "  selector:\n    app.kubernetes.io/name: gateway-broker",
         "  selector:\n    app.kubernetes.io/name: gateway-brokers")
    problems = check.check_kubernetes(base)
    assert any("NetworkPolicy/gateway-site: ingress from" in p for p in problems), problems
    assert any("Service/gateway-broker: its selector matches no pod" in p for p in problems), problems


def test_dockerfile_rules_catch_root_latest_no_healthcheck_and_dev_tools(tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM python:latest\nCOPY pyproject.toml uv.lock ./\nCOPY missing.txt ./\n"
                          "RUN pip install --no-cache-dir uv==0.13.9 && uv sync --frozen --group dev\n"
                          'CMD ["gateway", "--help"]\n')
    problems = check.check_dockerfile(dockerfile)
    expected = ["one stage", "FROM python:latest: pin the base image", "runs as root", "no HEALTHCHECK",
                "not a VOLUME", "installs the dev tools", "COPY of missing.txt"]
    for words in expected:
        assert any(words in p for p in problems), (words, problems)
    assert any("hadolint: " in p and "DL3007" in p for p in problems), problems  # hadolint itself ran


def test_hadolint_findings_fail_the_shipped_dockerfile_when_planted(deploy):
    edit(deploy / "Dockerfile", "RUN pip install --no-cache-dir uv==0.13.9", "RUN pip install uv")
    problems = check.check_dockerfile(deploy / "Dockerfile")
    assert any("DL3013" in p for p in problems) and any("DL3042" in p for p in problems), problems


@needs_systemd
def test_systemd_verify_rejects_an_unknown_key_and_security_a_weakened_unit(deploy):
    units = deploy / "systemd"
    edit(units / "gateway-broker.service", "Restart=on-failure", "Restart=on-failure\nRestartSeconds=5")
    for line in ("ProtectSystem=strict\n", "SystemCallFilter=@system-service\n", "CapabilityBoundingSet=\n",
                 "PrivateDevices=yes\n", "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX\n",
                 "ProtectKernelTunables=yes\n", "RestrictNamespaces=yes\n"):
        edit(units / "gateway-site@.service", line, "")
    problems = check.check_systemd(units)
    assert any("Unknown key 'RestartSeconds'" in p for p in problems), problems
    assert any("gateway-site@example.service" in p and "exposure" in p.lower() for p in problems), problems


def test_embedded_broker_config_and_policy_are_loaded_with_the_gateway_loaders(deploy):
    base = deploy / "k8s" / "base"
    edit(base / "broker-config-configmap.yaml", "deadline_seconds: 10", "deadline_secs: 10")
    edit(base / "site-policy-configmap.yaml", "max_rows_per_unit: 1", "max_rows_per_unit: 0")
    edit(deploy / "compose" / "broker.yaml", "address: north:50051\n    tls:", "address: north:50051\n    tlss:")
    problems = check.check_embedded_configs(base, deploy / "compose" / "broker.yaml")
    assert any("broker.yaml" in p and "deadline_secs" in p for p in problems), problems
    assert any("ConfigMap/gateway-site-policy/policy.yaml" in p and "max_rows_per_unit" in p for p in problems)
    assert any("compose/broker.yaml:" in p and "tlss" in p for p in problems), problems


def test_server_settings_are_checked_as_each_compose_service_starts_and_in_the_examples(deploy):
    edit(deploy / "compose.yaml", "      GATEWAY_SITE_TLS_KEY: /etc/gateway/certs/dev-south.key\n", "")
    edit(deploy / "compose.yaml", "command: [broker, serve, --config, /etc/gateway/broker.yaml]",
         "command: [broker, serve, --config, /etc/gateway/broker.yaml, --port, '70000']")
    edit(deploy / "config" / "site.yaml", "metrics_port: 9464", "metrics_prot: 9464")
    problems = check.check_server_settings(deploy)
    compose = deploy / "compose.yaml"
    assert f"{compose}: services/south: {deploy / 'compose' / 'site.yaml'}:4: tls_key: tls_cert and tls_key go " \
           "together" in problems, problems
    assert f"{compose}: services/broker: --port: port: should be at most 65535; got 70000" in problems
    assert any(p.startswith(f"{deploy / 'config' / 'site.yaml'}: ") and "did you mean 'metrics_port'" in p
               for p in problems)
    assert len(problems) == 3, problems


def test_a_committed_key_or_certificate_is_found(deploy, tmp_path):
    from gateway.demo.certs import make_dev_certs

    make_dev_certs(deploy / "k8s" / "base" / "certs", ["north"])
    problems = check.check_no_key_material(deploy)
    assert any("dev-north.key: holds a PEM private key" in p for p in problems), problems
    assert any("dev-ca.pem: holds a PEM certificate" in p for p in problems), problems
