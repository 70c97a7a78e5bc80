"""Unit tests for gateway.errors: what a status carries to a caller."""

from __future__ import annotations

import base64

import pytest

from gateway.errors import MAX_MESSAGE_BYTES, GatewayError, InvalidQuery, PolicyViolation, bounded

GRPC_METADATA_LIMIT = 8 * 1024  # what a gRPC client accepts by default


def test_a_short_text_is_kept_whole() -> None:
    assert bounded("unknown dataset 'x'") == "unknown dataset 'x'"
    assert bounded("é" * (MAX_MESSAGE_BYTES // 2)) == "é" * (MAX_MESSAGE_BYTES // 2)


@pytest.mark.parametrize("char", ["x", "é", "€", "🙂"])
def test_a_long_text_keeps_its_start_and_end_within_the_limit(char: str) -> None:
    text = "start " + char * 10_000 + " end"
    short = bounded(text)
    assert len(short.encode()) <= MAX_MESSAGE_BYTES
    assert short.startswith("start ") and short.endswith(" end") and " [...] " in short
    assert set(short.removeprefix("start ").removesuffix(" end").replace(" [...] ", "")) == {char}  # no torn character


@pytest.mark.parametrize("error", [
    InvalidQuery("expected a literal value, got '" + "(1, " * 5000 + "'", field="sql"),
    PolicyViolation("aggregate", repr("é" * 5000) + " is not allowed on 'patients'"),
], ids=["ascii", "non-ascii"])
def test_a_status_fits_the_metadata_a_client_accepts(error: GatewayError) -> None:
    status = error.to_status()
    # grpc-message is percent-encoded (each byte outside printable ASCII takes three); the details go in base64
    message = sum(1 if 0x20 <= b < 0x7F and b != ord("%") else 3 for b in status.details.encode())
    details = sum(len(base64.b64encode(value)) for key, value in status.trailing_metadata)
    assert message + details < GRPC_METADATA_LIMIT - 512  # room for the other headers
