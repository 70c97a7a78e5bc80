"""The broker's configuration file (gateway.broker.config): what it refuses, and how it reads paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.broker import load_broker_config


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
    with pytest.raises(ValueError, match="Extra inputs"):
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
