"""Server settings (gateway._settings): flags > environment > config file > defaults, paths relative to
where they were given, and every problem as where: field: reason (file:line, $VARIABLE or --flag)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway._engine import EngineLimits
from gateway.broker.config import BrokerConfig, BrokerConfigError, load_broker_settings
from gateway.cli import _parser
from gateway.site.settings import SiteConfigError, SiteSettings, load_site_settings, load_site_settings_file

SITE = """\
# the operator's settings of the north site
policy: north.yaml
state_dir: state
host: 0.0.0.0
port: 50051
metrics_port: 9464
trusted_keys: [keys/idp.pem]
tls_cert: tls/site.crt
tls_key: tls/site.key
client_ca: tls/ca.crt
allow_peers: [network-broker]
"""


def _file(tmp_path: Path, text: str, name: str = "site.yaml") -> Path:
    path = tmp_path / "etc" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def _site_problems(tmp_path: Path, text: str | None, env: dict[str, str] | None = None,
                   flags: dict[str, object] | None = None) -> list[str]:
    path = None if text is None else _file(tmp_path, text)
    with pytest.raises(SiteConfigError) as info:
        load_site_settings(path, env or {}, flags)
    return [p.removeprefix(f"{path}:") for p in info.value.problems]


def test_a_site_config_file_alone_gives_every_setting_with_paths_relative_to_it(tmp_path):
    path = _file(tmp_path, SITE)
    settings = load_site_settings(path, {})
    etc = path.parent.resolve()
    assert settings.policy == etc / "north.yaml" and settings.state_dir == etc / "state"
    assert settings.trusted_keys == (etc / "keys" / "idp.pem",)
    assert (settings.tls_cert, settings.tls_key, settings.client_ca) == (etc / "tls/site.crt", etc / "tls/site.key",
                                                                         etc / "tls/ca.crt")
    assert (settings.host, settings.port, settings.metrics_port, settings.allow_peers) == ("0.0.0.0", 50051, 9464,
                                                                                           ("network-broker",))
    assert settings.stop_grace == 10.0 and settings.drain_seconds is None  # defaults


def test_flags_beat_the_environment_which_beats_the_file(tmp_path):
    path = _file(tmp_path, SITE)
    env = {"GATEWAY_SITE_PORT": "6000", "GATEWAY_SITE_METRICS_PORT": "7000", "GATEWAY_SITE_STATE_DIR": "elsewhere",
           "GATEWAY_SITE_ALLOW_PEERS": "broker-a, broker-b", "PATH": "/bin", "GATEWAY_TOKEN": "not a setting"}
    settings = load_site_settings(path, env, {"port": 6001})
    assert settings.port == 6001  # the flag
    assert settings.metrics_port == 7000  # the variable
    assert settings.state_dir == Path("elsewhere")  # a variable's path: relative to the working directory
    assert settings.allow_peers == ("broker-a", "broker-b")  # comma-separated
    assert settings.host == "0.0.0.0"  # the file
    assert load_site_settings(path, {"GATEWAY_SITE_PORT": ""}).port == 50051  # an empty variable is unset


def test_settings_without_a_file_come_from_the_environment_and_flags():
    settings = load_site_settings(None, {"GATEWAY_SITE_POLICY": "/srv/p.yaml", "GATEWAY_SITE_JWKS_URL":
                                         "https://idp.example.org/jwks"}, {"trusted_keys": [Path("a.pem")]})
    assert settings.policy == Path("/srv/p.yaml") and settings.port == 50051 and settings.trusted_keys == (
        Path("a.pem"),)


@pytest.mark.parametrize(("text", "env", "flags", "expected"), [
    (SITE.replace("metrics_port: 9464", "metrics_prot: 9464"), {}, {},
     ["6: metrics_prot: unknown key 'metrics_prot'; did you mean 'metrics_port'? known keys here: allow_peers, "
      "audience, client_ca, drain_seconds, engine_memory_limit, engine_threads, host, issuer, jwks, jwks_url, "
      "max_token_lifetime, metrics_host, metrics_port, policy, port, port_file, state_dir, stop_grace, tls_cert, "
      "tls_key, trusted_keys"]),
    (SITE.replace("port: 50051", "port: 70000"), {}, {}, ["5: port: should be at most 65535; got 70000"]),
    (SITE.replace("tls_key: tls/site.key\n", ""), {}, {}, ["2: tls_key: tls_cert and tls_key go together"]),
    (SITE.replace("trusted_keys: [keys/idp.pem]\n", ""), {}, {},
     ["2: trusted_keys: no token keys: give trusted_keys (--trusted-key PEM), jwks or jwks_url"]),
    (SITE + "max_token_lifetime: 12x\n", {}, {},
     ["12: max_token_lifetime: bad ttl '12x': use e.g. 90s, 15m, 1h, 7d"]),
    (SITE, {"GATEWAY_SITE_PORT": "fifty"}, {}, ["$GATEWAY_SITE_PORT: port: should be a whole number"]),
    (SITE, {"GATEWAY_SITE_METRIC_PORT": "1"}, {},
     ["$GATEWAY_SITE_METRIC_PORT: (environment): unknown setting; did you mean $GATEWAY_SITE_METRICS_PORT? known "
      "variables: GATEWAY_SITE_ALLOW_PEERS, GATEWAY_SITE_AUDIENCE, GATEWAY_SITE_CLIENT_CA, "
      "GATEWAY_SITE_DRAIN_SECONDS, GATEWAY_SITE_ENGINE_MEMORY_LIMIT, GATEWAY_SITE_ENGINE_THREADS, "
      "GATEWAY_SITE_HOST, GATEWAY_SITE_ISSUER, GATEWAY_SITE_JWKS, GATEWAY_SITE_JWKS_URL, "
      "GATEWAY_SITE_MAX_TOKEN_LIFETIME, GATEWAY_SITE_METRICS_HOST, GATEWAY_SITE_METRICS_PORT, GATEWAY_SITE_POLICY, "
      "GATEWAY_SITE_PORT, GATEWAY_SITE_PORT_FILE, GATEWAY_SITE_STATE_DIR, GATEWAY_SITE_STOP_GRACE, "
      "GATEWAY_SITE_TLS_CERT, GATEWAY_SITE_TLS_KEY, GATEWAY_SITE_TRUSTED_KEYS"]),
    (SITE, {}, {"stop_grace": -1.0}, ["--stop-grace: stop_grace: should be at least 0; got -1.0"]),
    (SITE.replace("policy: north.yaml\n", ""), {}, {},
     ["2: policy: is required: give --policy, $GATEWAY_SITE_POLICY or policy: in the config file"]),
    (None, {"GATEWAY_SITE_JWKS": "keys.json"}, {},
     ["--policy: policy: is required: give --policy, $GATEWAY_SITE_POLICY or policy: in the config file"]),
    ("policy: p.yaml\nport: 1\nport: 2\njwks: k.json\n", {}, {}, ["3: port: key appears more than once"]),
    ("policy: [p.yaml\n", {}, {}, ["2: (yaml): expected ',' or ']', but got '<stream end>'"]),
    (SITE + "engine_memory_limit: 16MB\n", {}, {},
     ["12: engine_memory_limit: should be at least 64MiB; got 15.3MiB"]),
    (SITE, {"GATEWAY_SITE_ENGINE_MEMORY_LIMIT": "lots"}, {},
     ["$GATEWAY_SITE_ENGINE_MEMORY_LIMIT: engine_memory_limit: could not parse value and unit from byte string"]),
    (SITE, {}, {"engine_threads": 0}, ["--engine-threads: engine_threads: should be at least 1; got 0"]),
])
def test_every_problem_says_where_it_was_given(tmp_path, text, env, flags, expected):
    assert _site_problems(tmp_path, text, env, flags) == expected


def test_the_engines_limits_come_in_any_unit_from_file_variable_or_flag(tmp_path):
    path = _file(tmp_path, SITE + "engine_memory_limit: 4GiB\nengine_threads: 2\n")
    assert load_site_settings(path, {}).engine_limits() == EngineLimits(4 * 2**30, 2)
    assert load_site_settings(path, {"GATEWAY_SITE_ENGINE_MEMORY_LIMIT": "512MB"}).engine_limits().memory_bytes == (
        512_000_000)
    assert load_site_settings(path, {}, {"engine_memory_limit": "1.5GB"}).engine_limits().memory_bytes == 1_500_000_000
    assert load_site_settings(_file(tmp_path, SITE, "plain.yaml"), {}).engine_limits() == EngineLimits(None, None)


def test_a_file_checked_on_its_own_may_leave_the_token_keys_to_flags(tmp_path):
    path = _file(tmp_path, "policy: north.yaml\n")
    assert load_site_settings_file(path).policy == path.parent.resolve() / "north.yaml"
    with pytest.raises(SiteConfigError, match="no token keys"):
        load_site_settings(path, {})


BROKER = """\
name: network-broker
sites:
  - {name: north, address: '127.0.0.1:50051'}
trusted_keys: [idp.pem]
"""


def test_the_broker_reads_the_same_settings_under_its_own_prefix_and_its_sites_from_the_file_only(tmp_path):
    path = _file(tmp_path, BROKER, "broker.yaml")
    config = load_broker_settings(path, {"GATEWAY_BROKER_PORT": "6100", "GATEWAY_SITE_PORT": "1"},
                                  {"metrics_port": 9465})
    assert (config.port, config.metrics_port, config.trusted_keys) == (6100, 9465, (path.parent.resolve() / "idp.pem",))
    assert load_broker_settings(path, {}).port == 50050  # its own default
    with pytest.raises(BrokerConfigError) as info:
        load_broker_settings(path, {"GATEWAY_BROKER_SITES": "north"})
    assert info.value.problems == ["$GATEWAY_BROKER_SITES: sites: cannot be set from the environment: give it in "
                                   "the config file"]


def test_every_setting_but_the_sites_has_a_flag_on_its_serve_command():
    parser = _parser()
    for command, model in (("site", SiteSettings), ("broker", BrokerConfig)):
        serve = parser._subparsers._group_actions[0].choices[command]._subparsers._group_actions[0].choices["serve"]
        dests = {action.dest for action in serve._actions}
        flagless = {"sites", "name", "deadline_seconds", "min_sites", "reconnect_seconds"}
        assert set(model.model_fields) - flagless <= dests, command


def test_site_check_config_says_ok_or_lists_every_problem(tmp_path, capsys):
    from gateway import cli

    good, bad = _file(tmp_path, SITE), _file(tmp_path, "policy: p.yaml\nprot: 1\nstop_grace: -1\n", "bad.yaml")
    assert cli.main(["site", "check-config", str(good)]) == 0
    assert capsys.readouterr().out == f"{good}: ok (policy {good.parent.resolve() / 'north.yaml'})\n"
    assert cli.main(["site", "check-config", str(good), str(bad)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{bad}:2: prot: unknown key 'prot'; did you mean 'port'? known keys here: " + ", ".join(
            sorted(SiteSettings.model_fields)),
        f"{bad}:3: stop_grace: should be at least 0; got -1"]


def test_broker_serve_without_a_config_file_says_where_to_give_one(capsys, monkeypatch):
    from gateway import cli

    monkeypatch.delenv("GATEWAY_BROKER_CONFIG", raising=False)
    assert cli.main(["broker", "serve", "--trusted-key", "k.pem"]) == 2
    assert capsys.readouterr().err == ("gateway: error: no broker config: pass --config FILE or set "
                                       "GATEWAY_BROKER_CONFIG (the file names the sites)\n")
