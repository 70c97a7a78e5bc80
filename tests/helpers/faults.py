"""Faults the real components meet: raw TCP servers that stay silent or speak garbage, a gRPC site
that corrupts a real site's answers (each a real server on a loopback port), and a disk that refuses
every write."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc

from gateway._proto.gateway.v1 import gateway_pb2 as pb
from gateway._proto.gateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway._server import make_server, target_of
from gateway.audit import AuditLog
from gateway.site import RunningSite


class RawServer:
    """A TCP server on loopback that accepts every connection, noting when, and then sends ``reply``
    once it has read something; with ``reply=None`` it never sends anything and never closes a
    connection; with ``hang_up`` it closes each connection at once (a port nobody serves)."""

    def __init__(self, reply: bytes | None = None, port: int = 0, hang_up: bool = False) -> None:
        self.reply, self.hang_up = reply, hang_up
        self._listener = socket.create_server(("127.0.0.1", port))
        self._listener.settimeout(0.05)
        self.port = self._listener.getsockname()[1]
        self.connections: list[socket.socket] = []
        self.accepted: list[float] = []  # time.monotonic() of each connection
        self._stopped = threading.Event()
        self._threads = [threading.Thread(target=self._accept, name="raw-server", daemon=True)]
        self._threads[0].start()

    @property
    def target(self) -> str:
        return target_of("127.0.0.1", self.port)

    def close(self) -> None:
        self._stopped.set()
        for thread in self._threads:
            thread.join()
        for conn in self.connections:
            conn.close()
        self._listener.close()

    def __enter__(self) -> RawServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.accepted.append(time.monotonic())
            if self.hang_up:
                conn.close()
                continue
            self.connections.append(conn)
            if self.reply is not None:
                thread = threading.Thread(target=self._answer, args=(conn, self.reply), daemon=True)
                self._threads.append(thread)
                thread.start()

    def _answer(self, conn: socket.socket, reply: bytes) -> None:
        conn.settimeout(0.05)
        sent = False
        while not self._stopped.is_set():
            try:
                if not conn.recv(65536):
                    return  # the client closed the connection
            except TimeoutError:
                continue
            except OSError:
                return
            if not sent:
                sent = True
                try:
                    conn.sendall(reply)
                except OSError:
                    return


class _Liar(pb_grpc.GatewayServicer):
    def __init__(self, real: RunningSite, corrupt: Callable[[pb.QueryResponse], None]) -> None:
        self._channel = grpc.insecure_channel(real.target)
        self._stub = pb_grpc.GatewayStub(self._channel)
        self._corrupt = corrupt

    def Query(self, request: pb.QueryRequest, context: grpc.ServicerContext) -> pb.QueryResponse:
        metadata = [(k, v) for k, v in context.invocation_metadata() if k == "authorization"]
        response: pb.QueryResponse = self._stub.Query(request, metadata=metadata, timeout=10)
        self._corrupt(response)
        return response


class LyingSite:
    """TEST ONLY: a gRPC site that asks a real site every query and corrupts its answer with ``corrupt``
    before answering (a faulty or compromised site whose answers are well-formed messages)."""

    def __init__(self, real: RunningSite, corrupt: Callable[[pb.QueryResponse], None]) -> None:
        self._servicer = _Liar(real, corrupt)
        self.server, self.port, _health, self._workers = make_server(self._servicer, "127.0.0.1", 0, None)

    @property
    def target(self) -> str:
        return target_of("127.0.0.1", self.port)

    def close(self) -> None:
        self.server.stop(0).wait()
        self._workers.shutdown(wait=False)
        self._servicer._channel.close()

    def __enter__(self) -> LyingSite:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def full_disk(log: AuditLog) -> Iterator[None]:
    """Writes to ``log`` fail with ENOSPC, as on a full disk, until the block ends.

    The log's descriptor points at ``/dev/full`` meanwhile: the kernel's own "no space left on
    device", with the log's code unchanged.
    """
    saved = os.dup(log.fileno())
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        os.dup2(full, log.fileno())
        yield
    finally:
        os.dup2(saved, log.fileno())
        os.close(saved)
        os.close(full)
