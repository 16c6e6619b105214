"""The host's gRPC servicers in this process: grpc.aio on a loopback port chosen by the kernel, a
clock the test moves, no shared memory (every channel is relayed), no subprocess.

    async with in_process_host() as h:
        vm = await h.attach(hvsock_pb2.Hello(host=True, token=h.token))
        ...
        h.advance(2.5)          # the core's timers due by then fire now, not 2.5 s from now

The servicers, the Host around the core and the core are the ones ``hvsock-host`` runs
(``host_service.server.build_server``); only the clock and the port differ. Tests here run in
milliseconds, so adapter behaviour (status codes, frames, stream ends) is tested here and the
subprocess tests keep what needs a real process (signals, death, the descriptor socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from host_service.core.config import HostConfig
from host_service.dataplane import DataPlane
from host_service.server import build_server
from host_service.service import Host, new_core
from hvsock.v1 import hvsock_pb2, hvsock_pb2_grpc
from hvsock_common.conventions import TOKEN_METADATA

TOKEN = "adapter-host-token"


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class AttachStream:
    """One attach stream: requests with ids, answers matched to them, the rest queued."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self._ids = itertools.count(1)
        self.unsolicited: list[hvsock_pb2.AttachResponse] = []
        self.welcome: hvsock_pb2.Welcome | None = None

    async def send(self, **kind: Any) -> int:
        request_id = next(self._ids)
        await self.call.write(hvsock_pb2.AttachRequest(request_id=request_id, **kind))
        return request_id

    async def notify(self, **kind: Any) -> None:
        await self.call.write(hvsock_pb2.AttachRequest(request_id=0, **kind))

    async def answer(self, request_id: int) -> hvsock_pb2.AttachResponse:
        """The answer to ``request_id``; what arrives before it is kept in ``unsolicited``."""
        while True:
            response = await self.call.read()
            if response is grpc.aio.EOF:
                raise AssertionError(f"stream ended before the answer to {request_id}")
            if response.request_id == request_id:
                return response
            self.unsolicited.append(response)

    async def request(self, **kind: Any) -> hvsock_pb2.AttachResponse:
        return await self.answer(await self.send(**kind))

    async def next_unsolicited(self) -> hvsock_pb2.AttachResponse:
        if self.unsolicited:
            return self.unsolicited.pop(0)
        response = await self.call.read()
        if response is grpc.aio.EOF:
            raise AssertionError("stream ended")
        return response


@dataclasses.dataclass
class InProcessHost:
    host: Host
    port: int
    channel: grpc.aio.Channel
    clock: FakeClock
    token: str

    @property
    def core(self) -> Any:
        return self.host.core

    @property
    def host_api(self) -> hvsock_pb2_grpc.HostServiceStub:
        return hvsock_pb2_grpc.HostServiceStub(self.channel)

    @property
    def admin(self) -> hvsock_pb2_grpc.AdminServiceStub:
        return hvsock_pb2_grpc.AdminServiceStub(self.channel)

    @property
    def admin_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((TOKEN_METADATA, self.token),)

    async def until(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        """Let the server run until ``condition()`` holds: a request that is not answered
        (yet) has no other sign that the server has taken it."""
        give_up = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > give_up:
                raise AssertionError(f"not true within {timeout} s: {condition}")
            await asyncio.sleep(0.001)  # hand the loop to the server, then look again

    def advance(self, seconds: float) -> None:
        """Move the clock on and carry out every core timer due by then."""
        self.clock.now += seconds
        self.host.run_timers()

    async def attach(self, hello: hvsock_pb2.Hello) -> AttachStream:
        """An attach stream that said ``hello`` and was welcomed (AssertionError otherwise)."""
        stream = AttachStream(self.host_api.Attach())
        answer = await stream.request(hello=hello)
        assert answer.WhichOneof("kind") == "welcome", answer
        stream.welcome = answer.welcome
        return stream


@contextlib.asynccontextmanager
async def in_process_host(
    relay_window: int | None = None, *, forward: bool = True, **config: Any
) -> AsyncIterator[InProcessHost]:
    """A host with ``HostConfig(**config)`` serving on 127.0.0.1 (port chosen by the kernel),
    with the default relay window unless ``relay_window`` says another; ``forward=False``
    keeps channels relayed at both ends on rings with pumps (``--relay-rings``)."""
    clock = FakeClock()
    settings = HostConfig(**config)
    core = new_core(settings, TOKEN, now=clock())
    host = Host(
        core,
        dataplane=DataPlane(map_timeout=settings.connect_timeout, forward=forward),
        clock=clock,
        **({} if relay_window is None else {"relay_window": relay_window}),
    )
    server, _health = build_server(host, TOKEN)
    port = server.add_insecure_port("127.0.0.1:0")
    host.start()
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield InProcessHost(host, port, channel, clock, TOKEN)
    finally:
        await channel.close()
        await server.stop(None)
        host.close()
