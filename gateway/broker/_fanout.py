"""The broker's calls to its sites: every site's call on one asyncio loop, in one thread of its own.

gRPC's synchronous ``future()`` starts a thread per channel each time a channel goes from idle to
busy, so a query through an idle broker started one thread per site: about a tenth of a
millisecond each, most of the broker's own time at 16 sites and more. Here every call is a
``grpc.aio`` call on one loop that lives as long as the broker: no thread per call or per site.
Each call still ends by its own deadline, however many queries wait on a silent site, and
:meth:`Fanout.call`'s future, cancelled when the caller goes, cancels every call it made.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import Any

import grpc

from .._proto.gateway.v1 import gateway_pb2_grpc as pb_grpc
from .._transport import open_aio_channel
from .config import SiteEntry

# what one site's call gave: its response, or the gRPC error or cancellation that ended it, and the
# seconds from the fan-out's start to its end
Result = tuple[str, Any | None, BaseException | None, float]


class Fanout:
    """Channels to the sites and the loop that drives every call to them."""

    def __init__(self, sites: Sequence[SiteEntry], max_receive: int, reconnect_seconds: float) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="broker-fanout", daemon=True)
        self._thread.start()

        async def connect() -> dict[str, grpc.aio.Channel]:  # aio channels belong to the loop they are made on
            return {s.name: open_aio_channel(s.address, s.tls, max_receive=max_receive,
                                             reconnect_seconds=reconnect_seconds) for s in sites}

        self._channels = asyncio.run_coroutine_threadsafe(connect(), self._loop).result()
        self._stubs = {name: pb_grpc.GatewayStub(channel) for name, channel in self._channels.items()}

    def call(self, method: str, requests: Mapping[str, Any], metadata: Sequence[tuple[str, str]],
             timeout: float) -> Future[list[Result]]:
        """Call ``method`` at each site with its request, all at once; results in the order given.

        Cancelling the returned future cancels every call still in flight.
        """
        async def one(name: str, request: Any, started: float) -> Result:
            try:
                response = await getattr(self._stubs[name], method)(request, metadata=metadata, timeout=timeout)
                return name, response, None, time.monotonic() - started
            except grpc.RpcError as err:
                return name, None, err, time.monotonic() - started

        async def every() -> list[Result]:
            started = time.monotonic()
            return list(await asyncio.gather(*(one(name, request, started) for name, request in requests.items())))

        return asyncio.run_coroutine_threadsafe(every(), self._loop)

    def close(self) -> None:
        """Close the channels (ending any call still in flight) and stop the loop. Idempotent."""
        if self._loop.is_closed():
            return

        async def close_all() -> None:
            await asyncio.gather(*(channel.close() for channel in self._channels.values()))

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(close_all(), self._loop).result(timeout=30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
        self._loop.close()
