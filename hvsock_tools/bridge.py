"""``hvsock bridge``: a socat-like relay between plain sockets and emulated hv sockets.

Two directions of set-up, one relay:

- listen on TCP ``HOST:PORT`` or a Unix socket and, for each client, connect to an hv address
  ``(vm_id, service_id)`` from a partition (a VM's, or the host's);
- listen on an hv address in a partition and, for each connection, connect to a plain TCP (or
  Unix) address: a plain service published as an hv service.

The relay is asyncio protocols on both ends (an :class:`~guest_client.HvSocket`'s ``fileno()``
readiness drives asyncio's selector transports), with back-pressure both ways. What each end
does is passed through to the other:

- end of stream (``SHUT_WR``, a FIN) becomes ``shutdown(SHUT_WR)`` on the other end, and the
  other direction keeps flowing (half-close);
- a TCP/Unix reset (``ECONNRESET``) or any error closes the hv end at once. hv_sock has no RST:
  the hv peer sees end of stream, data still in flight towards it is dropped, and its next
  sends fail with ``EPIPE`` once the close has taken effect;
- an hv error (``ECONNRESET`` when the host service goes away, ``EPIPE`` when the hv peer has
  closed while the plain side still sends) resets the plain end (``SO_LINGER`` 0, an RST);
- a refused or timed-out hv connect resets the plain client at once; a refused plain connect
  closes the accepted hv connection at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import errno
import logging
import os
import re
import socket
import stat
import struct
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from guest_client import HV_PROTOCOL_RAW, HVSOCKET_CONNECT_TIMEOUT, Partition
from hvsock_common import addresses as _addresses

log = logging.getLogger("hvsock.bridge")

__all__ = [
    "Bridge",
    "HvEndpoint",
    "PlainEndpoint",
    "parse_endpoint",
    "run_in_thread",
]

PAGE = 4096
READ_CHUNK = 256 * 1024
HIGH_WATER = 1024 * 1024

VM_ALIASES = {
    "parent": _addresses.PARENT,
    "wildcard": _addresses.WILDCARD,
    "any": _addresses.WILDCARD,
    "children": _addresses.CHILDREN,
    "loopback": _addresses.LOOPBACK,
    "silohost": _addresses.SILOHOST,
    "broadcast": _addresses.BROADCAST,
}


@dataclasses.dataclass(frozen=True)
class HvEndpoint:
    """``hv:VM:SERVICE``: VM is a GUID, an alias (parent, wildcard, children, loopback) or a
    VM's name (``vm_name``, looked up for each connection: see ``Bridge(resolve_vm=...)``);
    SERVICE a GUID or a port number (the VSOCK template service id for it)."""

    vm_id: str
    service_id: str
    vm_name: str = ""

    @property
    def address(self) -> tuple[str, str]:
        return (self.vm_id, self.service_id)

    def __str__(self) -> str:
        return f"hv:{self.vm_name or self.vm_id}:{self.service_id}"


@dataclasses.dataclass(frozen=True)
class PlainEndpoint:
    """``tcp:HOST:PORT`` (or just ``HOST:PORT``) or ``unix:PATH``."""

    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def is_unix(self) -> bool:
        return bool(self.path)

    def __str__(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


Endpoint = HvEndpoint | PlainEndpoint


def parse_service(text: str) -> str:
    """A service GUID, or a port number mapped onto the VSOCK template."""
    text = text.strip()
    if text.isdigit():
        port = int(text)
        if port > 0xFFFFFFFF:
            raise ValueError(f"port out of range: {text}")
        return _addresses.service_id_for_port(port)
    return _guid(text)


def _guid(text: str) -> str:
    import uuid

    try:
        value = uuid.UUID(text.strip("{}"))
    except ValueError:
        raise ValueError(f"not a GUID or port: {text!r}") from None
    return str(value)


def parse_vm(text: str) -> str:
    alias = VM_ALIASES.get(text.lower())
    return alias if alias is not None else _guid(text)


#: What a VM name in an endpoint may look like (a container or host name, say).
_VM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def parse_endpoint(text: str) -> Endpoint:
    """``hv:VM:SERVICE``, ``tcp:HOST:PORT``, ``HOST:PORT`` or ``unix:PATH``."""
    scheme, sep, rest = text.partition(":")
    if sep and scheme.lower() == "hv":
        vm, sep, service = rest.rpartition(":")
        if not sep or not vm:
            raise ValueError(f"expected hv:VM:SERVICE, not {text!r}")
        service_id = parse_service(service)
        try:
            return HvEndpoint(parse_vm(vm), service_id)
        except ValueError:
            if not _VM_NAME.fullmatch(vm):
                raise ValueError(f"not a VM id, alias or name: {vm!r}") from None
            return HvEndpoint("", service_id, vm_name=vm)
    if sep and scheme.lower() == "unix":
        if not rest:
            raise ValueError("unix: needs a path")
        return PlainEndpoint(path=rest)
    if sep and scheme.lower() == "tcp":
        text = rest
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, not {text!r}")
    if int(port) > 65535:
        raise ValueError(f"not a TCP port: {port} (in {text!r}; 0-65535)")
    return PlainEndpoint(host=host.strip("[]") or "0.0.0.0", port=int(port))


# -------------------------------------------------------------------------------------------
# The relay
# -------------------------------------------------------------------------------------------


def _is_hv(transport: asyncio.BaseTransport) -> bool:
    sock = transport.get_extra_info("socket")
    return sock is not None and sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)


class Side(asyncio.BufferedProtocol):
    """One end of a relayed connection; ``peer`` is the other end."""

    def __init__(self, stats: Stats | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
        self.buffer = bytearray(READ_CHUNK)
        self.eof_in = False  # this end sent us end of stream
        self.eof_out = False  # we passed end of stream on to this end
        self.lost = False
        self.stats = stats
        self.on_lost: Callable[[], None] | None = None
        self.doomed = False
        #: Read before the other end existed; passed on by ``link``. (Pythons before 3.11.x's
        #: fix start a new transport's reader after ``connection_made`` even when it paused
        #: reading, so bytes can arrive unasked; Debian bookworm's 3.11.2 does.)
        self.early = bytearray()

    # -- linking ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.doomed:  # reset before the transport existed (the other end failed first)
            self.reset()
            return
        transport.set_write_buffer_limits(high=HIGH_WATER)
        if self.peer is None:
            transport.pause_reading()  # until the other end exists

    def link(self, peer: Side) -> None:
        self.peer, peer.peer = peer, self
        for side, other in ((self, peer), (peer, self)):
            if side.early:
                side.buffer_updated(0)  # pass on what came early
            if side.eof_in:
                other.send_eof()
            if side.transport is not None and not side.lost and not side.transport.is_reading():
                side.transport.resume_reading()

    # -- data ------------------------------------------------------------------------------

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        peer = self.peer
        if peer is None:
            self.early += self.buffer[:nbytes]
            if self.transport is not None:
                # Stop the reader the transport started anyway: resume re-registers it (so
                # the transport knows it reads), pause then really removes it.
                self.transport.resume_reading()
                self.transport.pause_reading()
            return
        if peer.lost or peer.transport is None:
            return
        if self.early:
            data = bytes(self.early + self.buffer[:nbytes])
            nbytes = len(data)
            self.early.clear()
            peer.transport.write(data)
        else:
            peer.transport.write(self.buffer[:nbytes])
        if self.stats is not None:
            self.stats.bytes += nbytes

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer.lost:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer.lost:
            self.peer.transport.resume_reading()

    # -- end of stream and errors ----------------------------------------------------------

    def eof_received(self) -> bool:
        self.eof_in = True
        if self.peer is not None:
            self.peer.send_eof()
        # Both directions done: False lets the transport close itself; else keep writing the
        # other direction (half-close).
        return not self.eof_out

    def send_eof(self) -> None:
        if self.lost or self.eof_out or self.transport is None:
            return
        self.eof_out = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        if self.eof_in:
            self.transport.close()  # flushes what is buffered first

    def reset(self) -> None:
        """Tear this end down at once: an RST on TCP/Unix, a close (no RST exists) on hv."""
        if self.transport is None:
            self.doomed = True
            return
        if self.lost:
            return
        if not _is_hv(self.transport):
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.on_lost is not None:
            self.on_lost()
        peer = self.peer
        if peer is None or peer.lost:
            return
        if exc is not None:
            peer.reset()  # errors pass through
        elif not self.eof_in:
            # Closed without an end of stream from this end (a close we did not ask for).
            peer.send_eof()
            if peer.transport is not None:
                peer.transport.close()


@dataclasses.dataclass
class Stats:
    accepted: int = 0
    active: int = 0
    failed_connects: int = 0
    bytes: int = 0


# -------------------------------------------------------------------------------------------
# Bridge
# -------------------------------------------------------------------------------------------


class QuietReset:
    """An hv listening socket as asyncio's accept loop sees it.

    When the host service goes away, the listener is reset and its ``accept()`` raises
    ``ConnectionResetError`` once. asyncio's accept loop takes every accept error but a few
    for a bug and logs it with a traceback ("Exception in callback ..._accept_connection"),
    for an event every restart of the host brings. Here it ends this listener with one log
    line (asyncio's quiet ``ConnectionAbortedError``); the owner listens again once the
    partition is attached again. Everything else is the socket's own.
    """

    def __init__(self, sock: Any, what: str) -> None:
        self._sock = sock
        self._what = what

    def accept(self) -> Any:
        try:
            return self._sock.accept()
        except ConnectionResetError:
            log.warning(
                "%s: the host service went away; listening again once it is back", self._what
            )
            raise ConnectionAbortedError(errno.ECONNABORTED, "the listener was reset") from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def quiet_reset(sock: Any, what: str) -> Any:
    """``sock`` for ``loop.create_server(sock=...)`` (see QuietReset): typed as the socket
    asyncio asks for, which it is in all but its type."""
    return QuietReset(sock, what)


def hv_connect_socket(
    partition: Partition, ring_pages: int, connect_timeout_ms: int | None = None
) -> Any:
    sock = partition.socket()
    if ring_pages:
        size = (ring_pages - 1) * PAGE
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    if connect_timeout_ms:
        sock.setsockopt(HV_PROTOCOL_RAW, HVSOCKET_CONNECT_TIMEOUT, connect_timeout_ms)
    return sock


class Bridge:
    """Relay every connection accepted on ``listen`` to a new connection to ``connect``.

    Exactly one of the two is an :class:`HvEndpoint`, on ``partition``.
    """

    def __init__(
        self,
        listen: Endpoint,
        connect: Endpoint,
        partition: Partition,
        *,
        ring_pages: int = 64,
        connect_timeout_ms: int | None = None,
        backlog: int = 256,
        connect_workers: int = 64,
        resolve_vm: Callable[[str], str] | None = None,
    ) -> None:
        """``resolve_vm(name) -> vm_id`` finds a VM named in ``connect`` (blocking; run in a
        worker thread for each connection, so a VM that was re-created is found again)."""
        if isinstance(listen, HvEndpoint) == isinstance(connect, HvEndpoint):
            raise ValueError("a bridge joins one hv endpoint and one tcp/unix endpoint")
        if isinstance(listen, HvEndpoint) and listen.vm_name:
            raise ValueError("listen on a VM id or alias; VM names are for the connect side")
        if isinstance(connect, HvEndpoint) and connect.vm_name and resolve_vm is None:
            raise ValueError(f"no way to look up the VM named {connect.vm_name!r}")
        self.resolve_vm = resolve_vm
        if not 0 <= ring_pages <= 64 or ring_pages == 1:
            raise ValueError("ring pages are 2..64 (0: the host's default)")
        self.listen_at = listen
        self.connect_to = connect
        self.partition = partition
        self.ring_pages = ring_pages
        self.connect_timeout_ms = connect_timeout_ms
        self.backlog = backlog
        self.stats = Stats()
        self.server: asyncio.AbstractServer | None = None
        self.address: Any = None  # where it listens (the bound TCP port for port 0)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            connect_workers, thread_name_prefix="hvsock-bridge-connect"
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._sides: set[Side] = set()
        self._closing = False

    # -- listening -------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        listen = self.listen_at
        if isinstance(listen, HvEndpoint):
            await self._listen_hv(listen)
            threading.Thread(
                target=self._keep_listening,
                args=(loop, listen),
                name="hvsock-bridge-relisten",
                daemon=True,
            ).start()
        elif listen.is_unix:
            with contextlib.suppress(FileNotFoundError):
                if not os.path.exists(listen.path) or is_socket(listen.path):
                    os.unlink(listen.path)
            self.server = await loop.create_unix_server(
                self._accepted, listen.path, backlog=self.backlog
            )
            self.address = listen.path
        else:
            self.server = await loop.create_server(
                self._accepted, listen.host, listen.port, backlog=self.backlog, reuse_address=True
            )
            self.address = self.server.sockets[0].getsockname()[:2]

    async def _listen_hv(self, listen: HvEndpoint) -> None:
        loop = asyncio.get_running_loop()
        sock = self.partition.socket()
        try:
            sock.bind(listen.address)
            await loop.run_in_executor(self._executor, sock.listen, self.backlog)
            sock.setblocking(False)
            self.server = await loop.create_server(
                self._accepted, sock=quiet_reset(sock, f"bridge on {listen}"), backlog=self.backlog
            )  # (a duck-typed socket)
        except BaseException:
            sock.close()
            raise
        self.address = sock.getsockname()

    def _keep_listening(self, loop: asyncio.AbstractEventLoop, listen: HvEndpoint) -> None:
        """A daemon thread: when the host service goes away, the hv listener goes with it;
        listen again once the partition has attached again (it does so by itself)."""

        async def replace(old: asyncio.AbstractServer | None) -> None:
            if old is not None:
                old.close()
            if not self._closing:
                await self._listen_hv(listen)

        while True:
            self.partition.wait_lost()
            if self._closing or self.partition.closed:
                return
            old = self.server
            self.partition.wait_attached()
            try:
                asyncio.run_coroutine_threadsafe(replace(old), loop).result()
            except (OSError, RuntimeError) as exc:  # lost again meanwhile, or loop closed
                log.info("bridge: listening again on %s failed: %s", listen, exc)
                if loop.is_closed():
                    return
                continue
            log.info("bridge: listening again on %s after the host service came back", listen)

    def _accepted(self) -> Side:
        side = Side(self.stats)
        self.stats.accepted += 1
        self.stats.active += 1
        self._track(side)
        task = asyncio.get_running_loop().create_task(self._open_other_end(side))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return side

    def _track(self, side: Side) -> None:
        self._sides.add(side)

        def lost() -> None:
            self._sides.discard(side)

        side.on_lost = lost

    async def _open_other_end(self, accepted: Side) -> None:
        loop = asyncio.get_running_loop()
        other = Side(self.stats)
        try:
            await self._connect(loop, other)
        except (TimeoutError, OSError):
            self.stats.failed_connects += 1
            self.stats.active -= 1
            accepted.reset()  # refused: close the accepted end at once
            return
        self._track(other)
        prior = other.on_lost

        def done() -> None:
            if prior is not None:
                prior()
            self.stats.active -= 1

        other.on_lost = done
        if accepted.lost:
            other.reset()
            return
        accepted.link(other)

    async def _connect(self, loop: asyncio.AbstractEventLoop, side: Side) -> None:
        target = self.connect_to
        if isinstance(target, HvEndpoint):
            address = target.address
            if target.vm_name and self.resolve_vm is not None:
                vm_id = await loop.run_in_executor(self._executor, self.resolve_vm, target.vm_name)
                address = (vm_id, target.service_id)
            await hv_open(
                loop,
                self.partition,
                address,
                side,
                ring_pages=self.ring_pages,
                connect_timeout_ms=self.connect_timeout_ms,
                executor=self._executor,
            )
        elif target.is_unix:
            await loop.create_unix_connection(lambda: side, target.path)
        else:
            await loop.create_connection(lambda: side, target.host, target.port)

    async def serve_forever(self) -> None:
        assert self.server is not None
        await self.server.serve_forever()

    async def aclose(self) -> None:
        self._closing = True
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await self.server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        for side in list(self._sides):
            if side.transport is not None and not side.lost:
                side.transport.abort()
        if isinstance(self.listen_at, PlainEndpoint) and self.listen_at.is_unix:
            with contextlib.suppress(OSError):
                os.unlink(self.listen_at.path)
        self._executor.shutdown(wait=False, cancel_futures=True)


def is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


async def hv_open(
    loop: asyncio.AbstractEventLoop,
    partition: Partition,
    address: tuple[str, str],
    side: Side,
    *,
    ring_pages: int,
    connect_timeout_ms: int | None,
    executor: concurrent.futures.Executor | None,
) -> None:
    """Connect an hv socket (the blocking connect in ``executor``) and put ``side`` on it."""
    sock = hv_connect_socket(partition, ring_pages, connect_timeout_ms)
    try:
        await loop.run_in_executor(executor, sock.connect, address)
        sock.setblocking(False)
        await loop.create_connection(lambda: side, sock=sock)
    except BaseException:
        sock.close()
        raise


# -------------------------------------------------------------------------------------------
# Running in a thread (tests, benchmarks, embedding)
# -------------------------------------------------------------------------------------------


class LoopThread:
    """An event loop in a daemon thread; ``call(coro)`` runs a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="hvsock-bridge", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Awaitable[Any], timeout: float | None = 30) -> Any:
        async def wrap() -> Any:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrap(), self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@contextlib.contextmanager
def run_in_thread(*servers: Any) -> Iterator[LoopThread]:
    """Start ``Bridge``/``HybridVsock`` objects (anything with ``start``/``aclose``) on an
    event loop in a background thread; close them on exit."""
    runner = LoopThread()
    started: list[Any] = []
    try:
        for server in servers:
            runner.call(server.start())
            started.append(server)
        yield runner
    finally:
        for server in reversed(started):
            with contextlib.suppress(Exception):
                runner.call(server.aclose(), timeout=10)
        runner.stop()
