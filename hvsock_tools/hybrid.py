"""A hybrid-vsock endpoint: the Firecracker / Cloud Hypervisor / OpenVMM Unix-socket model.

One Unix socket per VM (``path``). A host program connects to it and writes one line:

- ``CONNECT <port>\\n`` (decimal, 0..2**32-1): the endpoint connects, as the host partition,
  to ``(vm_id, <port>-facb-11e6-bd58-64006a7986d3)`` and answers ``OK <port>\\n``;
- ``CONNECT <service-guid>\\n``: connects to ``(vm_id, <guid>)`` and answers ``OK <guid>\\n``
  (the GUID in lower case), as OpenVMM's extension for Hyper-V sockets does.

Then the stream is the guest listener's. The ``CONNECT`` keyword is case-insensitive, separated
from its argument by one space; the whole request, newline included, is at most
``len("CONNECT 00000000-facb-11e6-bd58-64006a7986d3\\n")`` (45) bytes. Anything else (too
long, no newline before end of stream, a bad port or GUID) and a refused or timed-out connect
close the Unix connection without an answer, as those VMMs do. Bytes written after the newline
before ``OK`` arrives are passed on to the guest.

Guest-initiated connections: for each port P in ``guest_ports`` (and GUID S in
``guest_services``) the endpoint listens as the host partition on ``(vm_id, service)``; a
connection is relayed to the Unix socket ``<path>_<P>`` (falling back to ``<path>_<guid>``, as
OpenVMM does) or ``<path>_<S>``. If nothing listens there, the guest's connection is closed at
once (hv_sock has no RST; Firecracker sends one).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

from guest_client import Partition
from hvsock_common import addresses as _addresses

from .bridge import Side, Stats, hv_open, is_socket, quiet_reset

__all__ = ["MAX_REQUEST", "HybridVsock", "parse_request"]

log = logging.getLogger("hvsock.hybrid")

MAX_REQUEST = len("CONNECT 00000000-facb-11e6-bd58-64006a7986d3\n")
_REQUEST = re.compile(
    rb"(?i:connect) (?:(?P<port>[0-9]{1,10})"
    rb"|(?P<guid>[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}))"
)


def parse_request(line: bytes) -> tuple[str, str] | None:
    """``CONNECT <port>`` / ``CONNECT <guid>`` (without the newline) -> (service id, the text
    to answer after ``OK``), or None when malformed."""
    match = _REQUEST.fullmatch(line)
    if match is None:
        return None
    if match["port"] is not None:
        port = int(match["port"])
        if port > 0xFFFFFFFF:
            return None
        return _addresses.service_id_for_port(port), str(port)
    guid = match["guid"].decode().lower()
    return guid, guid


class _Handshake(asyncio.Protocol):
    def __init__(self, endpoint: HybridVsock) -> None:
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.done = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.done:
            return
        self.buffer += data
        newline = self.buffer.find(b"\n", 0, MAX_REQUEST)
        if newline < 0:
            if len(self.buffer) >= MAX_REQUEST:
                self._refuse()
            return
        line, rest = bytes(self.buffer[:newline]), bytes(self.buffer[newline + 1 :])
        self.done = True
        self.transport.pause_reading()
        request = parse_request(line)
        if request is None:
            self._refuse()
            return
        self.endpoint._spawn(self._connect(*request, rest))

    def eof_received(self) -> bool:
        if not self.done:
            self._refuse()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def _refuse(self) -> None:
        self.done = True
        self.endpoint.stats.failed_connects += 1
        if self.transport is not None:
            self.transport.close()

    async def _connect(self, service_id: str, answer: str, rest: bytes) -> None:
        endpoint = self.endpoint
        transport = self.transport
        assert transport is not None
        loop = asyncio.get_running_loop()
        hv_side = Side(endpoint.stats)
        try:
            vm_id = await endpoint.current_vm_id()
            await hv_open(
                loop,
                endpoint.partition,
                (vm_id, service_id),
                hv_side,
                ring_pages=endpoint.ring_pages,
                connect_timeout_ms=endpoint.connect_timeout_ms,
                executor=endpoint.executor,
            )
        except OSError as exc:
            log.info("hybrid-vsock %s: CONNECT %s refused: %s", endpoint.path, answer, exc)
            self._refuse()
            return
        if self.lost:
            hv_side.reset()
            return
        unix_side = Side(endpoint.stats)
        transport.set_protocol(unix_side)
        unix_side.connection_made(transport)
        endpoint._track(unix_side)
        endpoint._track(hv_side)
        transport.write(f"OK {answer}\n".encode())
        if rest and hv_side.transport is not None:
            hv_side.transport.write(rest)
        unix_side.link(hv_side)


class HybridVsock:
    """The hybrid-vsock Unix socket of one VM (see the module documentation).

    The VM is ``vm_id``, or with ``vm_name`` the VM of that name now: ``resolve_vm(vm_name)``
    (blocking, run in a worker thread) is asked for each ``CONNECT``, so a VM deleted and
    created again under its name is found again, never the one it replaced. The guest ports'
    listeners need an id when they start: ``vm_id`` (required with them).
    """

    def __init__(
        self,
        partition: Partition,
        vm_id: str,
        path: str,
        *,
        guest_ports: Sequence[int] = (),
        guest_services: Sequence[str] = (),
        ring_pages: int = 64,
        connect_timeout_ms: int | None = None,
        backlog: int = 256,
        vm_name: str = "",
        resolve_vm: Callable[[str], str] | None = None,
    ) -> None:
        if vm_name and resolve_vm is None:
            raise ValueError(f"no way to look up the VM named {vm_name!r}")
        if not vm_name and not vm_id:
            raise ValueError("a VM id or a VM name is needed")
        if (guest_ports or guest_services) and not vm_id:
            raise ValueError("guest ports and services listen on a VM id: give vm_id too")
        self.partition = partition
        self.vm_id = vm_id
        self.vm_name = vm_name
        self.resolve_vm = resolve_vm
        self.path = path
        self.listens: list[tuple[str, list[str]]] = []  # (service id, unix paths to try)
        for port in guest_ports:
            service = _addresses.service_id_for_port(port)
            self.listens.append((service, [f"{path}_{port}", f"{path}_{service}"]))
        for guid in guest_services:
            service = _addresses.parse_guid(guid, what="service id")
            self.listens.append((service, [f"{path}_{service}"]))
        self.ring_pages = ring_pages
        self.connect_timeout_ms = connect_timeout_ms
        self.backlog = backlog
        self.stats = Stats()
        self.executor = concurrent.futures.ThreadPoolExecutor(
            64, thread_name_prefix="hvsock-hybrid-connect"
        )
        self.servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._sides: set[Side] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if is_socket(self.path):
            os.unlink(self.path)
        self.servers.append(
            await loop.create_unix_server(lambda: _Handshake(self), self.path, backlog=self.backlog)
        )
        for service, paths in self.listens:
            sock = self.partition.socket()
            try:
                sock.bind((self.vm_id, service))
                await loop.run_in_executor(self.executor, sock.listen, self.backlog)
                sock.setblocking(False)
                server = await loop.create_server(
                    functools.partial(self._guest_connected, paths),
                    sock=quiet_reset(sock, f"hybrid-vsock {self.path} guest service {service}"),
                    backlog=self.backlog,
                )  # (a duck-typed socket)
            except BaseException:
                sock.close()
                raise
            self.servers.append(server)

    async def current_vm_id(self) -> str:
        """The VM a CONNECT goes to: looked up by name now, or the id given."""
        if not self.vm_name or self.resolve_vm is None:
            return self.vm_id
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.resolve_vm, self.vm_name)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _track(self, side: Side) -> None:
        self._sides.add(side)
        side.on_lost = lambda: self._sides.discard(side)

    def _guest_connected(self, paths: list[str]) -> Side:
        hv_side = Side(self.stats)
        self.stats.accepted += 1
        self._track(hv_side)
        self._spawn(self._to_unix(hv_side, paths))
        return hv_side

    async def _to_unix(self, hv_side: Side, paths: list[str]) -> None:
        loop = asyncio.get_running_loop()
        unix_side = Side(self.stats)
        for path in paths:
            try:
                await loop.create_unix_connection(lambda: unix_side, path)
            except OSError:
                continue
            break
        else:
            self.stats.failed_connects += 1
            hv_side.reset()  # nothing listens: close the guest's connection at once
            return
        self._track(unix_side)
        if hv_side.lost:
            unix_side.reset()
            return
        hv_side.link(unix_side)

    async def aclose(self) -> None:
        for server in self.servers:
            server.close()
            with contextlib.suppress(Exception):
                await server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        for side in list(self._sides):
            if side.transport is not None and not side.lost:
                side.transport.abort()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        self.executor.shutdown(wait=False, cancel_futures=True)
