"""The companion of ``hvsock run``: carries preloaded programs' AF_VSOCK sockets over hv sockets.

One companion per partition (a VM, or the host partition) holds one
:class:`~guest_client.Partition` and serves the shim (``hvsock_tools/preload/hvsock_preload.c``,
loaded into programs with ``LD_PRELOAD``) on an abstract Unix socket, ``@<name>``
(``HVSOCK_PRELOAD_SOCKET``). Two kinds of connection arrive there, told apart by the peer's
address:

- control connections (an unnamed peer): one request line, one reply line (``INFO``,
  ``CONNECT`` for a non-blocking connect, ``STATUS``, ``ADDRESSES``, ``LISTEN``, ``CLOSED``),
  or ``HOLD``, which keeps the companion alive for as long as it stays open (``hvsock run``
  holds one);
- data connections (a peer bound to ``<name>/s/<id>``, the identity of one vsock socket of a
  program): the program's descriptor itself. The companion relays its bytes to and from the
  hv socket it connected for that identity.

A blocking connect, the commonest call, sends no control request: its data connection arrives
on ``@<name>/connect`` instead, carrying one ``CONNECT`` line before any data, and the reply
line goes back on it (the shim reads exactly that line; channel data may follow at once).

For a program's listener, the companion listens on the hv side and, for each hv connection,
connects to the program's Unix listener from a socket bound to ``<name>/p/<cid>.<port>.<n>``:
the program's ``accept()`` learns the peer's vsock address from the real accept's address.

What a program sees follows hv_sock (see README, "Unmodified vsock programs"):

- connect: ``ENETUNREACH`` at once for a CID other than the host's (2) in a VM; the
  personality's error otherwise (``ETIMEDOUT`` after the connect timeout, ``ECONNREFUSED``);
- end of stream both ways (``shutdown(SHUT_WR)`` is a FIN on the channel, and a FIN or a
  rescind from the peer is end of stream for the program); ``SHUT_RD`` stays local: the
  companion stops reading the channel, whose ring then fills as it would in a VM;
- once the channel is rescinded (or the peer has closed), the program's sends fail with
  ``EPIPE``: the companion shuts the Unix connection for reading;
- a program's ``close()`` (its last descriptor) closes the channel.

Invariant: a data connection belongs to exactly one relay or is closed; the relay closes the
hv socket when the program's descriptor is gone (POLLHUP on our end), and closes our end of
the Unix connection only after draining it, so the program never sees a spurious reset.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import functools
import logging
import os
import random
import select
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import guest_client as hv
from hvsock_common import addresses
from hvsock_common.errors import HvError
from hvsock_common.workers import WorkerPool

log = logging.getLogger("hvsock.run")

PAGE = 4096
#: Bytes moved per call from the program to the hv socket.
RELAY_CHUNK = 128 * 1024

_buffers = threading.local()


def _relay_buffer() -> memoryview:
    """This worker thread's relay buffer: pumps run on pooled threads, one at a time each, so
    a connection costs no buffer of its own (a fresh 128 KiB one is mapped, zeroed and
    unmapped again by the allocator: a good part of a connect's cost in the companion)."""
    view: memoryview | None = getattr(_buffers, "view", None)
    if view is None:
        view = _buffers.view = memoryview(bytearray(RELAY_CHUNK))
    return view


#: How long a connect request waits for its data connection to be accepted here.
DATA_WAIT = 10.0
#: How often listeners are checked for a program that went away without closing them.
LISTENER_CHECK = 1.0
#: Local auto-bound ports: as vsock's, above the privileged range (24 tries, MAX_PORT_RETRIES).
EPHEMERAL_PORTS = (1024, 0x7FFFFFFF)
PORT_RETRIES = 24


def _peer_name(address: Any) -> str:
    """The abstract name in an address ``accept()`` returned ("" when the peer is unnamed)."""
    if isinstance(address, bytes) and address.startswith(b"\0"):
        return address[1:].decode("ascii", "replace")
    if isinstance(address, str) and address.startswith("\0"):
        return address[1:]
    return ""


def _port_of(service_id: str) -> int:
    """A service id's vsock port: the template's port, else Data1 (as Linux reports the port
    of a host connecting from a non-template id)."""
    port = addresses.port_for_service_id(service_id)
    return port if port is not None else uuid.UUID(service_id).fields[0]


def _errno_of(exc: BaseException) -> int:
    if isinstance(exc, HvError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    if isinstance(exc, TimeoutError):
        return errno.ETIMEDOUT
    return errno.EIO


def _reply_error(exc: BaseException) -> str:
    text = str(exc).replace("\n", " ")[:200] or os.strerror(_errno_of(exc))
    return f"ERR {_errno_of(exc)} {text}\n"


@dataclasses.dataclass
class Connection:
    """One vsock socket's connect, by identity: its progress, then its addresses."""

    state: str = "connecting"  # connecting | ok | err
    error: str = ""  # the ERR reply line, once failed
    addresses: tuple[int, int, int, int] = (0, 0, 0, 0)  # local cid, port; peer cid, port

    def ok_line(self) -> str:
        return "OK {} {} {} {}\n".format(*self.addresses)


class Companion:
    def __init__(
        self,
        partition: hv.Partition,
        name: str,
        *,
        is_host: bool,
        list_vm_ids: Callable[[], list[str]] | None = None,
        exit_when_unused: bool = False,
    ) -> None:
        self.partition = partition
        self.name = name
        self.is_host = is_host
        self.list_vm_ids = list_vm_ids
        self.exit_when_unused = exit_when_unused
        self.lock = threading.Condition()
        self.data: dict[str, socket.socket] = {}  # identity -> data connection, unclaimed
        self.connections: dict[str, Connection] = {}
        self.listeners: dict[str, Any] = {}  # identity -> hv listening socket
        self.relays = 0
        self.holders = 0
        self.stopped = threading.Event()
        self._seq = 0
        #: Threads are reused: a connect costs several jobs (its request, two relay pumps;
        #: the accepting side a delivery and two pumps), and starting a thread for each
        #: would cost more than the rest of the companion's work.
        self.pool = WorkerPool(max_idle=256)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.server.bind("\0" + name)
        except OSError:
            self.server.close()
            raise
        self.server.listen(4096)
        self.connector = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.connector.bind(f"\0{name}/connect")
        except OSError:
            self.server.close()
            self.connector.close()
            raise
        self.connector.listen(4096)

    # -- serving ------------------------------------------------------------------------------

    def serve(self) -> None:
        threading.Thread(target=self._watch_listeners, name="listener-watch", daemon=True).start()
        threading.Thread(target=self._serve_connects, name="connects", daemon=True).start()
        for conn, peer in self._accepting(self.server):
            if not peer:
                self.pool.run(functools.partial(self._control, conn), "control")
            elif peer.startswith(f"{self.name}/s/"):
                with self.lock:
                    old = self.data.pop(peer, None)
                    self.data[peer] = conn
                    self.lock.notify_all()
                if old is not None:
                    old.close()
            else:
                conn.close()  # not one of ours

    def _accepting(self, listening: socket.socket) -> Iterator[tuple[socket.socket, str]]:
        """What ``listening`` accepts, with the peer's abstract name, until the stop."""
        while not self.stopped.is_set():
            try:
                conn, address = listening.accept()
            except OSError:
                if self.stopped.is_set():
                    return
                raise
            yield conn, _peer_name(address)

    def stop(self) -> None:
        self.stopped.set()
        for listening in (self.server, self.connector):
            with contextlib.suppress(OSError):
                listening.shutdown(socket.SHUT_RDWR)
            listening.close()

    def _maybe_exit(self) -> None:
        if not self.exit_when_unused:
            return
        with self.lock:
            # Decided and done under the lock: a HOLD either counts before this (and keeps
            # the companion) or finds it stopped (and its hvsock run starts a new one).
            if self.holders or self.relays or self.listeners or self.stopped.is_set():
                return
            log.info("companion %s: no program uses it any more, stopping", self.name)
            self.stop()

    # -- control ------------------------------------------------------------------------------

    def _control(self, conn: socket.socket) -> None:
        with conn:
            try:
                words = _read_line(conn).split()
            except (OSError, ValueError):
                return
            if not words:
                return
            command, args = words[0], words[1:]
            if command == "HOLD":
                self._hold(conn)
                return
            try:
                reply = self._dispatch(conn, command, args)
            except (ValueError, IndexError) as exc:
                reply = f"ERR {errno.EINVAL} bad request {command}: {exc}\n"
            if reply:
                with contextlib.suppress(OSError):
                    conn.sendall(reply.encode())

    def _dispatch(self, conn: socket.socket, command: str, args: list[str]) -> str:
        if command == "INFO":
            limits = self.partition.limits
            local_cid = addresses.VMADDR_CID_HOST if self.is_host else addresses.VMADDR_CID_ANY
            return (
                f"INFO {local_cid} {limits.send_ring_page or 2} {limits.recv_ring_page or 3}"
                f" {limits.connect_timeout_ms or 2000}\n"
            )
        if command == "CONNECT":
            return self._connect(conn, *args)
        if command in ("STATUS", "ADDRESSES"):
            return self._status(args[0], consume=command == "STATUS")
        if command == "LISTEN":
            return self._listen(args[0], int(args[1]), int(args[2]), int(args[3]))
        if command == "CLOSED":
            self._check_listeners()
            return "OK\n"
        return f"ERR {errno.EINVAL} unknown request {command}\n"

    def _hold(self, conn: socket.socket) -> None:
        with self.lock:
            if self.stopped.is_set():
                return  # no HELD answer: the caller starts another companion
            self.holders += 1
        with contextlib.suppress(OSError):
            conn.sendall(b"HELD\n")
            while conn.recv(64):
                pass
        with self.lock:
            self.holders -= 1
        self._maybe_exit()

    def _status(self, ident: str, *, consume: bool) -> str:
        with self.lock:
            connection = self.connections.get(ident)
            if connection is None:
                return f"ERR {errno.ECONNRESET} unknown socket\n"
            if connection.state == "connecting":
                return "CONNECTING\n"
            if connection.state == "ok":
                return connection.ok_line()
            if consume:  # an error is reported once, as SO_ERROR clears it
                del self.connections[ident]
            return connection.error

    # -- connect ------------------------------------------------------------------------------

    def _remote(self, cid: int, port: int) -> tuple[str, str]:
        service_id = addresses.service_id_for_port(port)
        if not self.is_host:
            return addresses.vm_id_for_cid(cid), service_id
        vm_ids = self.list_vm_ids() if self.list_vm_ids is not None else []
        return addresses.vm_id_for_host_cid(cid, vm_ids), service_id

    def _peer_cid(self, vm_id: str) -> int:
        if not self.is_host or vm_id in (addresses.PARENT, addresses.LOOPBACK, addresses.ZERO):
            return addresses.VMADDR_CID_HOST
        if vm_id == self.partition.vm_id:
            return addresses.VMADDR_CID_HOST
        return addresses.cid_for_vm_id(vm_id)

    def _local_cid(self) -> int:
        return addresses.VMADDR_CID_HOST if self.is_host else addresses.VMADDR_CID_ANY

    def _open(
        self,
        remote: tuple[str, str],
        bound_port: int,
        timeout_ms: int,
        send_pages: int,
        recv_pages: int,
    ) -> tuple[Any, tuple[int, int, int, int]]:
        """An hv socket connected to ``remote``, and its addresses as the program sees them
        (local CID, port; peer CID, port). Raises the connect's error."""
        sock = self.partition.socket()
        try:
            if send_pages:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, (send_pages - 1) * PAGE)
            if recv_pages:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, (recv_pages - 1) * PAGE)
            sock.setsockopt(
                hv.HV_PROTOCOL_RAW,
                hv.HVSOCKET_CONNECT_TIMEOUT,
                max(1, min(timeout_ms, hv.HVSOCKET_CONNECT_TIMEOUT_MAX)),
            )
            if bound_port != hv.VMADDR_PORT_ANY:
                sock.bind((hv.HV_GUID_ZERO, addresses.service_id_for_port(bound_port)))
            sock.connect(remote)
            _, local_service = sock.getsockname()
            peer_vm, peer_service = sock.getpeername()
        except BaseException:
            sock.close()
            raise
        return sock, (
            self._local_cid(),
            _port_of(local_service),
            self._peer_cid(peer_vm),
            _port_of(peer_service),
        )

    def _connect(self, conn: socket.socket, *args: str) -> str:
        """A non-blocking connect (control ``CONNECT``): STARTED at once; the outcome is
        asked for with STATUS, and the data connection was connected before the request."""
        ident = args[0]
        cid, port, bound_port = int(args[1]), int(args[2]), int(args[3])
        timeout_ms, send_pages, recv_pages, fill = (int(a) for a in args[4:8])
        if not ident.startswith(f"{self.name}/s/"):
            raise ValueError("not a socket of this companion")
        try:
            remote = self._remote(cid, port)
        except HvError as exc:  # ENETUNREACH at once, as hv_sock's stream_allow check
            self._discard(ident)
            return _reply_error(exc)
        connection = Connection()
        with self.lock:
            self.connections[ident] = connection
        with contextlib.suppress(OSError):
            conn.sendall(b"STARTED\n")
        try:
            sock, connected = self._open(remote, bound_port, timeout_ms, send_pages, recv_pages)
        except (OSError, HvError) as exc:
            with self.lock:
                connection.state, connection.error = "err", _reply_error(exc)
            self._discard(ident)
            return ""
        data = self._take_data(ident)
        if data is None:
            sock.close()
            with self.lock:
                self.connections.pop(ident, None)
            return ""
        with self.lock:
            connection.addresses = connected
            connection.state = "ok"  # before POLLOUT: SO_ERROR must find it
            self.relays += 1
        with contextlib.suppress(OSError):  # the program is gone already: the relay finds out
            _discard_exactly(data, fill)
        Relay(self, ident, data, sock, recv_pages or self.partition.limits.recv_ring_page).start()
        return ""

    def _serve_connects(self) -> None:
        """Blocking connects: each data connection on ``@<name>/connect`` carries its request."""
        for data, ident in self._accepting(self.connector):
            if not ident.startswith(f"{self.name}/s/"):
                data.close()  # not one of ours
                continue
            self.pool.run(functools.partial(self._connect_blocking, ident, data), "connect")

    def _connect_blocking(self, ident: str, data: socket.socket) -> None:
        """``CONNECT cid port bound_port timeout_ms send_pages recv_pages`` on the data
        connection; the reply line on it, then the relay (this thread pumps one direction)."""
        try:
            words = _read_line(data).split()
            if len(words) != 7 or words[0] != "CONNECT":
                raise ValueError(f"not a connect request: {' '.join(words)[:100]!r}")
            cid, port, bound_port, timeout_ms, send_pages, recv_pages = map(int, words[1:])
            sock, connected = self._open(
                self._remote(cid, port), bound_port, timeout_ms, send_pages, recv_pages
            )
        except (OSError, HvError, ValueError) as exc:
            reply = (
                f"ERR {errno.EINVAL} bad request: {exc}\n"
                if isinstance(exc, ValueError)
                else _reply_error(exc)
            )
            with contextlib.suppress(OSError):
                data.sendall(reply.encode())
            _drain_and_close(data)
            return
        connection = Connection("ok", "", connected)
        with self.lock:
            # Known by identity, as every connected socket: a descriptor inherited across exec
            # is rebuilt from it (ADDRESSES).
            self.connections[ident] = connection
            self.relays += 1
        relay = Relay(self, ident, data, sock, recv_pages or self.partition.limits.recv_ring_page)
        with contextlib.suppress(OSError):  # the program is gone already: the relay finds out
            data.sendall(connection.ok_line().encode())
        relay.run_here()

    def _take_data(self, ident: str) -> socket.socket | None:
        """The data connection of ``ident`` (it was connected before the request was sent)."""
        deadline = time.monotonic() + DATA_WAIT
        with self.lock:
            while ident not in self.data:
                left = deadline - time.monotonic()
                if left <= 0 or self.stopped.is_set():
                    return None
                self.lock.wait(left)
            return self.data.pop(ident)

    def _discard(self, ident: str) -> None:
        """A failed connect: end the program's data connection so that it polls writable and
        hung up (the error itself is asked for with SO_ERROR)."""
        data = self._take_data(ident)
        if data is not None:
            _drain_and_close(data)

    def forget(self, ident: str) -> None:
        with self.lock:
            self.connections.pop(ident, None)
            self.relays -= 1
        self._maybe_exit()

    # -- listen -------------------------------------------------------------------------------

    def _listen(self, ident: str, cid: int, port: int, backlog: int) -> str:
        if not ident.startswith(f"{self.name}/s/"):
            raise ValueError("not a socket of this companion")
        try:
            if cid == hv.VMADDR_CID_ANY or not self.is_host:
                vm_id = addresses.WILDCARD
            else:
                vm_id = self._remote(cid, 0)[0]
                if vm_id == addresses.LOOPBACK:
                    vm_id = addresses.WILDCARD
        except HvError as exc:
            return _reply_error(exc)
        ports = (
            [port]
            if port != hv.VMADDR_PORT_ANY
            else [random.randrange(*EPHEMERAL_PORTS) for _ in range(PORT_RETRIES)]
        )
        last: BaseException | None = None
        for candidate in ports:
            sock = self.partition.socket()
            try:
                sock.bind((vm_id, addresses.service_id_for_port(candidate)))
                sock.listen(max(backlog, 1))
            except (OSError, HvError) as exc:
                sock.close()
                last = exc
                if _errno_of(exc) == errno.EADDRINUSE:
                    continue
                break
            with self.lock:
                self.listeners[ident] = sock
            threading.Thread(
                target=self._serve_listener, args=(ident, sock), name="hv-accept", daemon=True
            ).start()  # its own thread: it lives as long as the listener
            return f"OK {self._local_cid()} {candidate}\n"
        assert last is not None
        return _reply_error(last)

    def _serve_listener(self, ident: str, sock: Any) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return  # closed: the program closed its listener
            self.pool.run(functools.partial(self._deliver, ident, conn), "deliver")

    def _deliver(self, ident: str, conn: Any) -> None:
        """Hand one accepted hv connection to the program's listener."""
        peer_vm, peer_service = conn.getpeername()
        cid, port = self._peer_cid(peer_vm), _port_of(peer_service)
        with self.lock:
            self._seq += 1
            seq = self._seq
        data = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            data.bind(f"\0{self.name}/p/{cid}.{port}.{seq}")
            geometry = conn.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)  # ring bytes
            data.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, max(geometry * 2, 4096))
            data.connect("\0" + ident)  # waits while the program's backlog is full
        except OSError as exc:
            log.info("listener %s is gone (%s): closing it", ident, exc)
            data.close()
            conn.close()
            self._close_listener(ident)
            return
        with self.lock:
            self.relays += 1
        Relay(self, "", data, conn, 0).run_here()  # this is a pool worker already

    def _close_listener(self, ident: str) -> None:
        with self.lock:
            sock = self.listeners.pop(ident, None)
        if sock is not None:
            sock.close()
            self._maybe_exit()

    def _check_listeners(self) -> None:
        """Close the hv listeners whose program listener no longer exists (every descriptor
        closed, in every process): its abstract name is gone from /proc/net/unix."""
        with self.lock:
            idents = list(self.listeners)
        if not idents:
            return
        alive = _bound_abstract_names()
        for ident in idents:
            if ident not in alive:
                self._close_listener(ident)

    def _watch_listeners(self) -> None:
        while not self.stopped.wait(LISTENER_CHECK):
            self._check_listeners()


def _bound_abstract_names() -> set[str]:
    names = set()
    with open("/proc/net/unix") as table:
        next(table, None)
        for line in table:
            fields = line.split()
            if len(fields) >= 8 and fields[7].startswith("@"):
                names.add(fields[7][1:])
    return names


def _read_line(conn: socket.socket) -> str:
    """One request line (at most 1 KiB; nothing follows it until it is answered)."""
    line = b""
    while not line.endswith(b"\n"):
        chunk = conn.recv(1024 - len(line)) if len(line) < 1024 else b""
        if not chunk:
            raise ValueError("no complete request line")
        line += chunk
    return line.decode("ascii", "replace")


def _discard_exactly(data: socket.socket, count: int) -> None:
    """Read and drop ``count`` bytes: the filler a non-blocking connect put in the socket."""
    buffer = bytearray(min(max(count, 1), 1 << 16))
    while count > 0:
        n = data.recv_into(buffer, min(count, len(buffer)))
        if not n:
            return
        count -= n


def _drain_and_close(data: socket.socket) -> None:
    """Shut our end down both ways, read what the program left unread (so that it never sees
    a reset), then close."""
    with contextlib.suppress(OSError):
        data.shutdown(socket.SHUT_RDWR)
    data.setblocking(False)
    buffer = bytearray(1 << 16)
    with contextlib.suppress(OSError):
        while data.recv_into(buffer):
            pass
    data.close()


class Relay:
    """Bytes both ways between one program descriptor (``data``) and one hv socket."""

    def __init__(
        self, owner: Companion, ident: str, data: socket.socket, sock: Any, recv_pages: int
    ) -> None:
        self.owner = owner
        self.ident = ident
        self.data = data
        self.sock = sock
        self.left = 2  # threads still running; the last one closes the data connection
        self.lock = threading.Lock()
        if recv_pages:
            # What waits in the Unix connection for the program: up to 4 receive rings'
            # worth (the kernel doubles the value), as the shim sizes the other direction.
            data.setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, max((recv_pages - 1) * PAGE * 2, 4096)
            )

    def start(self) -> None:
        self.owner.pool.run(self._to_hv, "relay-in")
        self.owner.pool.run(self._to_program, "relay-out")

    def run_here(self) -> None:
        """Pump program -> channel on the calling thread (a pool worker), the other direction
        on another: one hand-off fewer than :meth:`start`."""
        self.owner.pool.run(self._to_program, "relay-out")
        self._to_hv()

    def _to_hv(self) -> None:
        """Program -> channel; then wait until the program's descriptor is gone, and close."""
        buffer = view = _relay_buffer()
        try:
            while True:
                try:
                    n = self.data.recv_into(buffer)
                except OSError:
                    n = 0  # the program went away with data unread: as a close
                if not n:
                    if not self._hung_up(0):  # closed outright: the close below sends the FIN
                        with contextlib.suppress(OSError):
                            self.sock.shutdown(socket.SHUT_WR)  # a half-close: the FIN
                    break
                try:
                    self.sock.sendall(view[:n])
                except OSError:
                    # Rescinded, or the peer closed: the program's sends fail with EPIPE
                    # from now on (our end no longer reads).
                    with contextlib.suppress(OSError):
                        self.data.shutdown(socket.SHUT_RD)
                    break
            self._hung_up(None)
            self.sock.close()  # the program's last descriptor is gone: close the channel
        finally:
            self._done()

    def _hung_up(self, timeout: float | None) -> bool:
        """Whether both directions of our end are shut (the program closed, or it shut writing
        and we shut writing): POLLHUP, waiting for it at most ``timeout`` (None: until then)."""
        poller = select.poll()
        poller.register(self.data.fileno(), 0)  # POLLHUP and POLLERR are always reported
        ended = select.POLLHUP | select.POLLERR | select.POLLNVAL
        while True:
            events = poller.poll(None if timeout is None else timeout * 1000)
            if any(mask & ended for _, mask in events):
                return True
            if timeout is not None:
                return False

    def _to_program(self) -> None:
        """Channel -> program. Reads cross packet boundaries here (one call per ring's worth,
        not per 16 KiB packet); the shim gives the program at most 16 KiB per read."""
        buffer = view = _relay_buffer()
        try:
            while True:
                try:
                    n = self.sock.recv_stream_into(buffer)
                except OSError:
                    n = 0  # closed under us (the program went away) or reset
                if not n:
                    # A rescind: the program's sends fail (EPIPE) from before it can see the
                    # end of stream, so none it makes after reading EOF is taken.
                    how = socket.SHUT_RDWR if self.sock.rescinded else socket.SHUT_WR
                    with contextlib.suppress(OSError):
                        self.data.shutdown(how)
                    return
                try:
                    self.data.sendall(view[:n])
                except OSError:
                    # The program shut reading (SHUT_RD: local in hv_sock) or went away: stop
                    # reading the channel; its ring fills and the peer waits, as with a VM.
                    return
        finally:
            self._done()

    def _done(self) -> None:
        with self.lock:
            self.left -= 1
            last = self.left == 0
        if last:
            _drain_and_close(self.data)
            self.owner.forget(self.ident)


# -------------------------------------------------------------------------------------------
# The process
# -------------------------------------------------------------------------------------------


def _vm_lister(target: str) -> Callable[[], list[str]]:
    """VM ids from the admin API, with the host token (host partition companions only)."""
    import grpc

    from ._api import list_vms

    def list_vm_ids() -> list[str]:
        token = hv.find_token(None) or ""
        with grpc.insecure_channel(target) as channel:
            vms = list_vms(channel, token, errno_code=errno.ENETUNREACH, doing="listing VMs")
        return [p.vm_id for p in vms]

    return list_vm_ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="abstract socket name (without @)")
    parser.add_argument("--host-partition", action="store_true")
    parser.add_argument("--exit-when-unused", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("HVSOCK_LOG_LEVEL", "WARNING").upper(),
        format="hvsock run companion: %(message)s",
    )
    target = os.environ.get("HVSOCK_HOST") or None
    try:
        partition = hv.attach_host(target) if args.host_partition else hv.attach(target)
    except (OSError, ValueError) as exc:
        print(f"error attaching: {exc}", flush=True)
        return 1
    try:
        companion = Companion(
            partition,
            args.name,
            is_host=args.host_partition,
            list_vm_ids=_vm_lister(partition.target) if args.host_partition else None,
            exit_when_unused=args.exit_when_unused,
        )
    except OSError as exc:
        partition.close()
        print(f"busy {exc.errno}", flush=True)  # another companion has the name: use it
        return 3
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: companion.stop())
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    print(f"ready {partition.vm_id}", flush=True)
    # Nothing more for the starter's pipe: it must see end of file once it has read this.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    try:
        companion.serve()
    finally:
        partition.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
