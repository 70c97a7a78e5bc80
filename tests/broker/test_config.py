"""The broker's configuration file (gateway.broker.config): what it refuses, how it reads paths, and
every problem as file:line: field: reason, like a site policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.broker import load_broker_config
from gateway.broker.config import BrokerConfigError


def test_broker_config_validation(tmp_path):
    path = tmp_path / "broker.yaml"
    path.write_text("sites:\n  - {name: a, address: '10.0.0.5:50051'}\n")
    with pytest.raises(ValueError, match="needs tls"):
        load_broker_config(path)
    path.write_text("sites:\n  - {name: a, address: '127.0.0.1:1'}\nmin_sites: 2\n")
    with pytest.raises(ValueError, match="min_sites"):
        load_broker_config(path)
    path.write_text("sites: []\n")
    with pytest.raises(ValueError, match="sites"):
        load_broker_config(path)
    path.write_text("sites:\n  - {name: a, address: '127.0.0.1:1', colour: red}\n")
    with pytest.raises(ValueError, match="unknown key 'colour'"):
        load_broker_config(path)
    path.write_text("sites:\n  - {name: a, address: 'h:1', tls: {ca: ca.pem, colour: red}}\n")
    with pytest.raises(ValueError, match="colour"):
        load_broker_config(path)
    path.write_text("sites:\n  - {name: a, address: 'h:1', tls: {ca: ca.pem, cert: b.pem}}\n")
    with pytest.raises(ValueError, match="both cert and key"):
        load_broker_config(path)
    path.write_text("sites:\n  - {name: a, address: 'h:1', tls: {cert: b.pem, key: b.key}}\n")
    with pytest.raises(ValueError, match="tls needs ca"):
        load_broker_config(path)
    path.write_text("sites:\n  - {name: a, address: 'h:1', tls: {ca: pki/ca.pem, cert: b.pem, key: /abs/b.key}}\n")
    tls = load_broker_config(path).sites[0].tls
    assert tls is not None
    assert (tls.ca, tls.cert, tls.key) == (tmp_path / "pki" / "ca.pem", tmp_path / "b.pem", Path("/abs/b.key"))


GOOD = """\
name: network-broker
deadline_seconds: 10
min_sites: 2
sites:
  - name: north
    address: 127.0.0.1:50051
  - name: south
    address: south.example.org:50051
    tls: {ca: pki/ca.pem, cert: broker.pem, key: broker.key}
"""


def problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "broker.yaml"
    path.write_text(text)
    with pytest.raises(BrokerConfigError) as info:
        load_broker_config(path)
    return [p.removeprefix(f"{path}:") for p in info.value.problems]


def test_a_good_config_loads_with_tls_paths_relative_to_it(tmp_path: Path) -> None:
    path = tmp_path / "broker.yaml"
    path.write_text(GOOD)
    config = load_broker_config(path)
    assert (config.name, config.min_sites, [s.name for s in config.sites]) == ("network-broker", 2,
                                                                               ["north", "south"])
    assert config.reconnect_seconds == 1.0  # a restarted site is reached again within about a second
    tls = config.sites[1].tls
    assert tls is not None and tls.ca == tmp_path / "pki" / "ca.pem" and tls.key == tmp_path / "broker.key"


@pytest.mark.parametrize(("text", "expected"), [
    (GOOD.replace("deadline_seconds: 10", "deadline_seconds: 0"),
     ["2: deadline_seconds: should be more than 0; got 0"]),
    (GOOD.replace("min_sites: 2", "min_sites: 2\nreconnect_seconds: 0"),
     ["4: reconnect_seconds: should be more than 0; got 0"]),
    (GOOD.replace("    address: south.example.org:50051\n", "    address: south.example.org:50051\n    port: 1\n"),
     ["9: sites.1.port: unknown key 'port'; known keys here: address, name, tls"]),
    (GOOD.replace("tls: {ca: pki/ca.pem, cert: broker.pem, key: broker.key}", "tls: {ca: pki/ca.pem, colour: x}"),
     ["9: sites.1.tls.colour: unknown key 'colour'; known keys here: ca, cert, key, server_name"]),
    (GOOD.replace("\n    tls: {ca: pki/ca.pem, cert: broker.pem, key: broker.key}", ""),
     ["7: sites.1: site south needs tls: plaintext is for loopback only"]),
    (GOOD.replace("min_sites: 2", "min_sites: 3"), ["1: (top): min_sites is larger than the number of sites"]),
    (GOOD.replace("name: south", "name: north"), ["1: (top): site names must be distinct"]),
    (GOOD + "min_sites: 1\n", ["10: min_sites: key appears more than once"]),
    ("- a\n", ["1: (file): a broker config must be a mapping of keys"]),
])
def test_every_problem_names_its_line_and_field(tmp_path: Path, text: str, expected: list[str]) -> None:
    assert problems(tmp_path, text) == expected
