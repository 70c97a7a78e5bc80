"""The researcher's client (gateway.client): typed errors when nothing answers, and an import that
stays light enough for the client-only distribution."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest

from gateway.client import Client
from gateway.errors import Unavailable


def test_unreachable_broker_is_typed(token):
    with Client("127.0.0.1:1", token=token(), retries=1, timeout=2) as c, pytest.raises(Unavailable):
        c.query("SELECT count(*) FROM patients")
    assert Unavailable.code == grpc.StatusCode.UNAVAILABLE


def test_the_client_loads_no_server_machinery() -> None:
    code = ("import sys, gateway.client, gateway.aggregates, gateway.answers, gateway.survival, gateway.plot\n"
            "heavy = ['opendp', 'duckdb', 'sqlglot', 'pydantic', 'yaml', 'gateway.policy', 'gateway._mechanisms',\n"
            "         'matplotlib']  # matplotlib only when a picture is drawn\n"
            "print(','.join(m for m in heavy if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == ""
