"""TLS material and gRPC channels: the one TLS type and the one channel builder of the gateway.

Client, CLI and broker open channels with :func:`open_channel`; servers take their credentials
from :func:`server_credentials`. Kept free of server dependencies (the client imports it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import grpc


@dataclass(frozen=True)
class Tls:
    """TLS material for one end of a connection.

    ``cert`` and ``key`` are this end's certificate (a server needs them; a client with them does
    mTLS). ``ca`` is whom to trust for the peer: on a client, the server's CA; on a server, the
    CA of client certificates, which makes every client present one (mTLS). ``server_name``
    (client only) overrides the name expected in the server's certificate.
    """

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    # parsed from broker config files too: unknown keys are errors there
    __pydantic_config__: ClassVar[dict[str, str]] = {"extra": "forbid"}

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("give both cert and key, or neither")

    def relative_to(self, base: Path) -> Tls:
        """The same material with relative paths resolved against ``base`` (a config file's folder)."""
        def resolve(path: Path | None) -> Path | None:
            return None if path is None else (base / path)
        return replace(self, ca=resolve(self.ca), cert=resolve(self.cert), key=resolve(self.key))


# a broker's answer carries every site's own answer too (each at most 3 MiB): room for 16 of them
MAX_RECEIVE = 64 * 2**20


def _read(path: Path | None) -> bytes | None:
    return None if path is None else path.read_bytes()


def open_channel(target: str, tls: Tls | None = None, *, max_receive: int = MAX_RECEIVE,
                 reconnect_seconds: float | None = None) -> grpc.Channel:
    """A channel to ``target``: plaintext without ``tls`` (loopback development), else TLS or mTLS.

    ``max_receive`` bounds the size of one response. ``reconnect_seconds`` caps the wait between
    attempts to reach a server that is down: gRPC's own backoff grows 1.6x per failed attempt up to
    two minutes, so a server that was down for ten seconds is reached again only seconds after it
    is back, and one down for a minute up to a minute after.
    """
    options, creds = _channel_args(tls, max_receive, reconnect_seconds)
    if creds is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, creds, options=options)


def open_aio_channel(target: str, tls: Tls | None = None, *, max_receive: int = MAX_RECEIVE,
                     reconnect_seconds: float | None = None) -> grpc.aio.Channel:
    """:func:`open_channel` for asyncio (``grpc.aio``), with the same options and credentials."""
    options, creds = _channel_args(tls, max_receive, reconnect_seconds)
    if creds is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, creds, options=options)


def _channel_args(tls: Tls | None, max_receive: int, reconnect_seconds: float | None
                  ) -> tuple[list[tuple[str, int | str]], grpc.ChannelCredentials | None]:
    options: list[tuple[str, int | str]] = [("grpc.max_receive_message_length", max_receive)]
    if reconnect_seconds is not None:
        longest = max(1, round(reconnect_seconds * 1000))
        # the first retry soon (a restart takes a moment), then at most ``longest`` apart; the
        # connect timeout (grpc.min_reconnect_backoff_ms, 20 s) is kept for slow TLS handshakes
        options += [("grpc.initial_reconnect_backoff_ms", min(longest, 250)),
                    ("grpc.max_reconnect_backoff_ms", longest)]
    if tls is None:
        return options, None
    creds = grpc.ssl_channel_credentials(_read(tls.ca), _read(tls.key), _read(tls.cert))
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return options, creds


def server_credentials(tls: Tls) -> grpc.ServerCredentials:
    """Server credentials from ``tls.cert``/``tls.key``; with ``tls.ca`` every client must present a certificate."""
    if tls.cert is None or tls.key is None:
        raise ValueError("a TLS server needs a certificate and key")
    ca = _read(tls.ca)
    return grpc.ssl_server_credentials([(tls.key.read_bytes(), tls.cert.read_bytes())], root_certificates=ca,
                                       require_client_auth=ca is not None)
