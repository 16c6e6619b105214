"""``HvSocket``: the standard-library socket API over an emulated hv_sock channel.

Differences from a kernel socket are deliberate and few: no ``MSG_PEEK``/OOB/datagrams
(``EOPNOTSUPP``, as hv_sock); ``fileno()`` is a private socketpair whose readiness mirrors the
channel (readable: data, EOF or a connection to accept; writable: ring space), so select, poll,
selectors and asyncio can wait on it, but reading or writing that fd directly moves no data.
"""

from __future__ import annotations

import errno
import os
import socket as _socket
import threading
from typing import TYPE_CHECKING, Any

from hvsock.v1 import hvsock_pb2
from hvsock_common import addresses
from hvsock_common.errors import HvError

from . import errors
from ._channel import DATA_PATH_NAMES, ChannelEnd, Listener
from ._readiness import Readiness

if TYPE_CHECKING:
    from ._partition import Partition

AF_HYPERV = 34
AF_VSOCK = 40
HV_PROTOCOL_RAW = 1
HVSOCKET_CONNECT_TIMEOUT = 1
HVSOCKET_CONNECT_TIMEOUT_MAX = 300000
HVSOCKET_CONNECTED_SUSPEND = 4
#: The emulator's own option (level HV_PROTOCOL_RAW), before connect/listen: the relay window
#: of this socket's sends in bytes (0: strict, a ring's back-pressure byte for byte; -1: the
#: host's default). Only matters on the gRPC relay; see Connect.relay_window in the API.
HVSOCKET_RELAY_WINDOW = 0x4856_0001
#: The largest relay window (the host refuses more).
HVSOCKET_RELAY_WINDOW_MAX = 16 * 1024 * 1024
HVSOCKET_ADDRESS_FLAG_PASSTHRU = 1
VMADDR_CID_ANY = addresses.VMADDR_CID_ANY
VMADDR_CID_HOST = addresses.VMADDR_CID_HOST
VMADDR_PORT_ANY = 0xFFFFFFFF
PAGE_SIZE = 4096
#: Most bytes one recv returns: one packet's payload (MAX_PIPE_DATA_PAYLOAD).
MAX_DELIVERY = 16384

_UNSUPPORTED_FLAGS = _socket.MSG_PEEK | _socket.MSG_OOB
_NEW, _BOUND, _LISTENING, _CONNECTING, _CONNECTED, _CLOSED = range(6)


def _parse_address(family: int, address: object) -> addresses.Address:
    """CPython's rules: a 2-tuple, TypeError for the wrong shape, ValueError for bad values."""
    if not isinstance(address, tuple) or len(address) != 2:
        raise TypeError(f"{_family_name(family)} address must be a tuple (vm_id, service_id)")
    first, second = address
    try:
        if family == AF_VSOCK:
            if not isinstance(first, int) or not isinstance(second, int):
                raise TypeError("AF_VSOCK address must be a tuple (cid, port) of int")
            return addresses.Address(
                addresses.vm_id_for_cid(first), addresses.service_id_for_port(second)
            )
        if not isinstance(first, str) or not isinstance(second, str):
            raise TypeError("AF_HYPERV address must be a tuple (vm_id, service_id) of str")
        return addresses.Address.parse(first, second)
    except HvError as err:
        raise ValueError(str(err)) from None


def _default_relay_window() -> int | None:
    """HVSOCK_RELAY_WINDOW for this program's sockets (None: the host's default)."""
    text = os.environ.get("HVSOCK_RELAY_WINDOW", "").strip()
    if not text:
        return None
    value = int(text)
    if not 0 <= value <= HVSOCKET_RELAY_WINDOW_MAX:
        raise ValueError(f"HVSOCK_RELAY_WINDOW must be in [0, {HVSOCKET_RELAY_WINDOW_MAX}]")
    return value


def _family_name(family: int) -> str:
    return "AF_VSOCK" if family == AF_VSOCK else "AF_HYPERV"


class HvSocket:
    """A Hyper-V socket of one partition (``Partition.socket()``)."""

    def __init__(
        self,
        partition: Partition,
        family: int = AF_HYPERV,
        type: int = _socket.SOCK_STREAM,
        proto: int = HV_PROTOCOL_RAW,
        *,
        _end: ChannelEnd | None = None,
    ) -> None:
        if family not in (AF_HYPERV, AF_VSOCK):
            raise OSError(errno.EAFNOSUPPORT, f"address family {family} not supported")
        if family == AF_VSOCK and partition.personality != "linux":
            raise OSError(errno.EAFNOSUPPORT, "AF_VSOCK sockets exist only in linux partitions")
        base_type = type & ~(_socket.SOCK_NONBLOCK | _socket.SOCK_CLOEXEC)
        if base_type != _socket.SOCK_STREAM:
            raise OSError(errno.ESOCKTNOSUPPORT, "hv_sock supports only SOCK_STREAM")
        if family == AF_HYPERV and proto != HV_PROTOCOL_RAW:
            raise OSError(errno.EPROTONOSUPPORT, "unsupported AF_HYPERV protocol")
        self.partition = partition
        self.family = family
        self.type = _socket.SOCK_STREAM
        self.proto = proto
        self._lock = threading.Lock()
        self._state = _NEW
        self._local: addresses.Address | None = None
        self._peer: addresses.Address | None = None
        self._end: ChannelEnd | None = None
        self._listener: Listener | None = None
        self._timeout: float | None = _socket.getdefaulttimeout()
        if type & _socket.SOCK_NONBLOCK:
            self._timeout = 0.0
        self._connect_timeout_ms = 0
        self._send_pages = 0
        self._recv_pages = 0
        self._relay_window = _default_relay_window()
        self._shut_rd = False
        self._shut_wr = False
        self._pending_connect: Any = None
        self._connect_error: OSError | None = None
        self._readiness: Readiness | None = None
        if _end is not None:
            self._attach_end(_end)

    # -- state helpers ---------------------------------------------------------------------

    def _attach_end(self, end: ChannelEnd) -> None:
        self._end = end
        self._state = _CONNECTED
        channel = end.channel
        self._local = addresses.Address(channel.local.vm_id, channel.local.service_id)
        self._peer = addresses.Address(channel.remote.vm_id, channel.remote.service_id)
        if self._readiness is not None:
            self._readiness.watch_end(end)

    @property
    def channel_id(self) -> int | None:
        """The host's id of this connection's channel (``hvsock channels``); None unconnected."""
        return self._end.channel_id if self._end is not None else None

    @property
    def data_path(self) -> str | None:
        """How this end moves data: ``"shm"`` (shared-memory rings) or ``"relay"`` (the gRPC
        relay, as ``hvsock channels`` calls it); None until connected."""
        if self._end is None:
            return None
        return DATA_PATH_NAMES[self._end.channel.data_path]

    @property
    def rescinded(self) -> bool:
        """Whether this connection's channel is gone: rescinded by the host (or the host went
        away). What is left can still be read, then end of stream; sends fail. False while
        unconnected, and after a mere FIN from the peer (sends still go through)."""
        end = self._end
        if end is None:
            return False
        if end.rescinded or end.reset:
            return True
        if end.closed:
            return False  # closed here: no longer this socket's to say (its rings are gone)
        pipe = end.pipe
        try:
            return pipe.rx.is_rescinded or pipe.tx.is_rescinded
        except OSError:  # closed by another thread just now
            return False

    def _check_open(self) -> None:
        if self._state == _CLOSED:
            raise OSError(errno.EBADF, "Bad file descriptor")

    def _connected_end(self) -> ChannelEnd:
        self._check_open()
        if self._state != _CONNECTED or self._end is None:
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")
        return self._end

    def _format(self, address: addresses.Address) -> tuple[Any, Any]:
        if self.family == AF_VSOCK:
            port = addresses.port_for_service_id(address.service_id)
            cid = VMADDR_CID_HOST if address.vm_id == addresses.PARENT else VMADDR_CID_ANY
            return (cid, port if port is not None else VMADDR_PORT_ANY)
        return (address.vm_id, address.service_id)

    def _op_timeout(self, flags: int) -> float | None:
        if flags & _UNSUPPORTED_FLAGS:
            raise OSError(errno.EOPNOTSUPP, "MSG_PEEK and MSG_OOB are not supported by hv_sock")
        if flags & _socket.MSG_DONTWAIT:
            return 0.0
        if flags & ~(_socket.MSG_DONTWAIT | _socket.MSG_WAITALL | _socket.MSG_NOSIGNAL):
            raise OSError(errno.EOPNOTSUPP, f"flags {flags:#x} not supported")
        return self._timeout

    # -- addresses -------------------------------------------------------------------------

    def bind(self, address: object) -> None:
        self._check_open()
        local = _parse_address(self.family, address)
        if self._state != _NEW:
            raise OSError(errno.EINVAL, "Invalid argument (socket already bound)")
        self._local = local
        self._state = _BOUND

    def getsockname(self) -> tuple[Any, Any]:
        self._check_open()
        if self._local is None:
            return self._format(addresses.Address(addresses.ZERO, addresses.ZERO))
        return self._format(self._local)

    def getpeername(self) -> tuple[Any, Any]:
        self._connected_end()
        assert self._peer is not None
        return self._format(self._peer)

    # -- listening -------------------------------------------------------------------------

    def listen(self, backlog: int = 128) -> None:
        self._check_open()
        if self._state == _LISTENING:
            return
        if self._state != _BOUND or self._local is None:
            raise OSError(errno.EINVAL, "Invalid argument (bind before listen)")
        backlog = max(1, min(int(backlog), 4096))
        # The host accepts up to `backlog` connections on our behalf (auto_accept); accept()
        # gives them back (Listener.accepted). The listener is registered as the answer
        # arrives, on the reader thread, so an opening right behind it finds it.
        answer = self.partition.listen(
            hvsock_pb2.Listen(
                address=hvsock_pb2.Address(
                    vm_id=self._local.vm_id, service_id=self._local.service_id
                ),
                backlog=backlog,
                auto_accept=backlog,
                relay_window=self._relay_window,
            ),
            backlog,
        )
        self._listener = answer[1]
        self._listener.relay_window = self._relay_window
        bound = answer[0].listening.address
        self._local = addresses.Address(bound.vm_id, bound.service_id)
        self._state = _LISTENING
        if self._readiness is not None:
            self._readiness.watch_listener(self._listener)

    def accept(self) -> tuple[HvSocket, tuple[Any, Any]]:
        self._check_open()
        listener = self._listener
        if self._state != _LISTENING or listener is None:
            raise OSError(errno.EINVAL, "Invalid argument (not listening)")
        with listener.changed:
            ok = listener.changed.wait_for(
                lambda: bool(listener.ready) or listener.closed or listener.reset,
                self._timeout if self._timeout != 0 else 0,
            )
            if listener.reset and not listener.ready:
                listener.reset_reported = True
                if self._readiness is not None:
                    self._readiness.update()
                raise ConnectionResetError(errno.ECONNRESET, "the host service went away")
            if listener.closed:
                raise OSError(errno.EBADF, "Bad file descriptor")
            if not ok:
                if self._timeout == 0:
                    raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
                raise TimeoutError("timed out")
            end = listener.ready.popleft()
        listener.accepted()
        if self._readiness is not None:
            self._readiness.update()
        child = HvSocket(self.partition, self.family, _socket.SOCK_STREAM, self.proto, _end=end)
        child._timeout = _socket.getdefaulttimeout()
        assert child._peer is not None
        return child, child._format(child._peer)

    # -- connecting ------------------------------------------------------------------------

    def connect(self, address: object) -> None:
        self._check_open()
        remote = _parse_address(self.family, address)
        if self._state == _CONNECTED:
            raise OSError(errno.EISCONN, "Transport endpoint is already connected")
        if self._state == _LISTENING:
            raise OSError(errno.EINVAL, "Invalid argument (listening socket)")
        if self._state == _CONNECTING:
            self._finish_connect(wait=self._timeout != 0)
            return
        local_service = self._local.service_id if self._local is not None else ""
        request = hvsock_pb2.Connect(
            remote=hvsock_pb2.Address(vm_id=remote.vm_id, service_id=remote.service_id),
            local_service_id=local_service,
            connect_timeout_ms=self._connect_timeout_ms,
            send_ring_pages=self._send_pages,
            recv_ring_pages=self._recv_pages,
            force_relay=not self.partition.shm,
            relay_window=self._relay_window,
        )
        self._connect_error = None
        # Connecting before the request leaves: its answer may be routed (on the reader
        # thread) before send_request returns, and must find the socket waiting for it.
        state, self._state = self._state, _CONNECTING
        try:
            self._pending_connect = self.partition.send_request(
                on_answer=self._on_connect_answer, connect=request
            )
        except BaseException:
            self._state = state
            raise
        self._finish_connect(wait=self._timeout != 0)

    def _on_connect_answer(self, answer: hvsock_pb2.AttachResponse) -> None:
        """Reader thread: the connect finished (opened or failed)."""
        if answer.WhichOneof("kind") == "opened":
            try:
                end = self.partition.open_end(answer.opened, 0)
            except OSError as exc:
                self._connect_error = exc
                return
            with self._lock:
                if self._state != _CONNECTING:  # closed meanwhile: give the channel back
                    end.close()
                    return
                self._attach_end(end)
        else:
            self._connect_error = errors.from_error(answer.error)
        if self._readiness is not None:
            self._readiness.update()

    def _finish_connect(self, *, wait: bool) -> None:
        pending = self._pending_connect
        if pending is None:
            raise OSError(errno.EALREADY, "Operation already in progress")
        if not pending.done.wait(self._timeout if wait else 0):
            if not wait:
                raise BlockingIOError(errno.EINPROGRESS, "Operation now in progress")
            # The socket's own timeout ran out first: abandon the connect.
            self._abandon_connect()
            raise TimeoutError("timed out")
        self._pending_connect = None
        if self._connect_error is not None:
            error, self._connect_error = self._connect_error, None
            self._state = _BOUND if self._local is not None else _NEW
            raise error
        if self._state != _CONNECTED:
            raise OSError(errno.EIO, "connect finished without a channel")

    def _abandon_connect(self) -> None:
        with self._lock:
            self._state = _BOUND if self._local is not None else _NEW
            self._pending_connect = None

    def connect_ex(self, address: object) -> int:
        try:
            self.connect(address)
        except (TypeError, ValueError):
            raise
        except OSError as exc:
            return exc.errno or errno.EIO
        return 0

    # -- data ------------------------------------------------------------------------------

    def send(self, data: Any, flags: int = 0) -> int:
        return self._write(data, flags, whole=False)

    def sendall(self, data: Any, flags: int = 0) -> None:
        self._write(data, flags, whole=True)

    def _write(self, data: Any, flags: int, *, whole: bool) -> int:
        timeout = self._op_timeout(flags) if flags else self._timeout
        end = self._end
        if end is None or self._state != _CONNECTED:
            end = self._connected_end()  # raises the right error
        if self._shut_wr:
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")
        if end.reset:
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        try:
            timeout = end.pipe.hold(False, timeout)  # the host may stall this end
            if whole:
                end.pipe.tx.write_all(data, timeout)
                return 0
            return end.pipe.tx.write(data, timeout)
        except TimeoutError:
            raise TimeoutError("timed out") from None
        except BrokenPipeError:
            # The ring says rescinded; if that is the host going away (heard now, or within
            # the settle wait: the peer's process may have heard it first and rescinded the
            # shared ring), the program sees the reset the README promises, not EPIPE.
            if end.ended_by_reset():
                raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer") from None
            raise
        finally:
            if self._readiness is not None:
                self._readiness.update()

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        return self._read(buffer, nbytes, flags, MAX_DELIVERY)

    def recv_stream_into(self, buffer: Any, nbytes: int = 0) -> int:
        """``recv_into`` across packet boundaries: as many bytes as the channel holds, up to
        ``nbytes`` (default: the buffer's size). Not a kernel socket call: for relays that
        hand the bytes to a reader which applies the 16 KiB delivery itself (``hvsock run``'s
        companion), and would otherwise pay one call per packet."""
        return self._read(buffer, nbytes, 0, 0)

    def _read(self, buffer: Any, nbytes: int, flags: int, limit: int) -> int:
        # The hot path of the shared-memory data path: keep the per-call checks few.
        timeout = self._op_timeout(flags) if flags else self._timeout
        end = self._end
        if end is None or self._state != _CONNECTED:
            end = self._connected_end()  # raises the right error
        if self._shut_rd:
            return 0
        if end.reset:
            # The host went away: a reset, as TCP's RST, drops what was still unread, so
            # every call after it fails alike (a rescind, by contrast, drains then EOF).
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        # One delivery is at most one VMBus packet's payload (16 KiB), as with hv_sock, whose
        # dequeue copies from a single packet per recvmsg.
        if nbytes <= 0:
            nbytes = len(buffer) if type(buffer) is bytearray else memoryview(buffer).nbytes
        if limit and nbytes > limit:
            nbytes = limit
        try:
            timeout = end.pipe.hold(True, timeout)
            n = end.pipe.rx.read_into(buffer, nbytes, timeout)
        except TimeoutError:
            raise TimeoutError("timed out") from None
        finally:
            if self._readiness is not None:
                self._readiness.update()
        if n == 0 and nbytes and end.ended_by_reset():
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        return n

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if bufsize < 0:
            raise ValueError("negative buffersize in recv")
        buffer = bytearray(bufsize)
        n = self.recv_into(buffer, bufsize, flags)
        del buffer[n:]
        return bytes(buffer)

    def sendto(self, *args: Any) -> int:
        raise OSError(errno.EOPNOTSUPP, "hv_sock has no datagrams")

    def recvfrom(self, *args: Any) -> tuple[bytes, Any]:
        raise OSError(errno.EOPNOTSUPP, "hv_sock has no datagrams")

    def shutdown(self, how: int) -> None:
        if how not in (_socket.SHUT_RD, _socket.SHUT_WR, _socket.SHUT_RDWR):
            raise OSError(errno.EINVAL, "Invalid argument")
        end = self._connected_end()
        if how in (_socket.SHUT_RD, _socket.SHUT_RDWR):
            self._shut_rd = True  # local only: no wire signal exists for it
        if how in (_socket.SHUT_WR, _socket.SHUT_RDWR) and not self._shut_wr:
            self._shut_wr = True
            end.shutdown_write()
        if self._readiness is not None:
            self._readiness.update()

    def close(self) -> None:
        with self._lock:
            if self._state == _CLOSED:
                return
            state, self._state = self._state, _CLOSED
        if self._listener is not None:
            self._listener.close()
        if self._end is not None:
            self._end.close()
        if state == _CONNECTING:
            self._pending_connect = None
        if self._readiness is not None:
            self._readiness.close()

    def detach(self) -> int:
        raise OSError(errno.EOPNOTSUPP, "an emulated hv socket cannot be detached")

    # -- options and modes -----------------------------------------------------------------

    def settimeout(self, value: float | None) -> None:
        if value is not None:
            value = float(value)
            if value < 0:
                raise ValueError("Timeout value out of range")
        self._timeout = value

    def gettimeout(self) -> float | None:
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        self._timeout = None if flag else 0.0

    def getblocking(self) -> bool:
        return self._timeout != 0.0

    def setsockopt(self, level: int, option: int, value: Any, optlen: int | None = None) -> None:
        self._check_open()
        number = int.from_bytes(value[:4], "little") if isinstance(value, bytes) else int(value)
        if level == HV_PROTOCOL_RAW and option == HVSOCKET_CONNECT_TIMEOUT:
            if not 0 <= number <= HVSOCKET_CONNECT_TIMEOUT_MAX:
                raise OSError(
                    errno.EINVAL,
                    f"HVSOCKET_CONNECT_TIMEOUT is at most {HVSOCKET_CONNECT_TIMEOUT_MAX} ms",
                )
            self._connect_timeout_ms = number
        elif level == _socket.SOL_SOCKET and option in (_socket.SO_SNDBUF, _socket.SO_RCVBUF):
            if self._state in (_CONNECTED, _CONNECTING):
                return  # rings cannot be resized once the channel is open (as on Linux)
            pages = min(max(number // PAGE_SIZE + 1, 2), 64)
            if option == _socket.SO_SNDBUF:
                self._send_pages = pages
            else:
                self._recv_pages = pages
        elif level == HV_PROTOCOL_RAW and option == HVSOCKET_RELAY_WINDOW:
            if not -1 <= number <= HVSOCKET_RELAY_WINDOW_MAX:
                raise OSError(
                    errno.EINVAL,
                    f"HVSOCKET_RELAY_WINDOW is -1 (default) to {HVSOCKET_RELAY_WINDOW_MAX}",
                )
            if self._state in (_CONNECTED, _CONNECTING, _LISTENING):
                return  # fixed once the channel (or listener) exists, like the rings
            self._relay_window = None if number < 0 else number
        elif level == _socket.SOL_SOCKET and option in (_socket.SO_REUSEADDR, _socket.SO_KEEPALIVE):
            return  # accepted and meaningless for hv_sock, as on Linux vsock
        else:
            raise OSError(errno.ENOPROTOOPT, "Protocol not available")

    def getsockopt(self, level: int, option: int, buflen: int | None = None) -> int:
        self._check_open()
        if level == HV_PROTOCOL_RAW and option == HVSOCKET_CONNECT_TIMEOUT:
            return self._connect_timeout_ms or int(self.partition.limits.connect_timeout_ms)
        if level == HV_PROTOCOL_RAW and option == HVSOCKET_RELAY_WINDOW:
            if self._end is not None and self._end.pipe.path == "relay":
                return int(self._end.channel.relay_window)
            return -1 if self._relay_window is None else self._relay_window
        if level == _socket.SOL_SOCKET and option in (_socket.SO_SNDBUF, _socket.SO_RCVBUF):
            geometry = self._end.channel.geometry if self._end is not None else None
            if option == _socket.SO_SNDBUF:
                pages = geometry.send_ring_pages if geometry else self._send_pages
                pages = pages or self.partition.limits.send_ring_page
            else:
                pages = geometry.recv_ring_pages if geometry else self._recv_pages
                pages = pages or self.partition.limits.recv_ring_page
            return (pages - 1) * PAGE_SIZE
        if level == _socket.SOL_SOCKET and option == _socket.SO_TYPE:
            return _socket.SOCK_STREAM
        if level == _socket.SOL_SOCKET and option == _socket.SO_ERROR:
            error, self._connect_error = self._connect_error, None
            return error.errno if error is not None and error.errno else 0
        raise OSError(errno.ENOPROTOOPT, "Protocol not available")

    def fileno(self) -> int:
        self._check_open()
        if self._readiness is None:
            self._readiness = Readiness()
            if self._end is not None:
                self._readiness.watch_end(self._end)
            elif self._listener is not None:
                self._readiness.watch_listener(self._listener)
            self._readiness.update()
        return self._readiness.fileno()

    def makefile(self, mode: str = "r", buffering: int | None = None, **kwargs: Any) -> Any:
        return _socket.socket.makefile(self, mode, buffering, **kwargs)  # type: ignore[call-overload]

    # makefile() uses these, as socket.socket does.
    _io_refs = 0
    _closed = False

    def _decref_socketios(self) -> None:
        self._io_refs -= 1

    def __enter__(self) -> HvSocket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = ("new", "bound", "listening", "connecting", "connected", "closed")[self._state]
        local = f" laddr={self._format(self._local)}" if self._local else ""
        peer = (
            f" raddr={self._format(self._peer)}" if self._peer and self._state == _CONNECTED else ""
        )
        return f"<HvSocket {_family_name(self.family)} {state}{local}{peer}>"
