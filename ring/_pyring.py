"""Pure-Python twin of ``ring._ring``: same API, same byte layout, same decisions.

This is the test oracle (the Hypothesis state machine runs it side by side with the compiled
ring and a model and compares every byte) and the explicit fallback selected with
``HVSOCK_RING_IMPL=python``. It follows ``ring/_ring.pyx`` line for line where bytes in the
ring depend on it: packet framing, write splitting, batch publication of read_index, the
signalling decisions (so the futex sequence words match too) and corruption checks.

Differences, all in waiting, none visible in the ring's bytes:

* Python has no memory fences. On x86 (TSO) plain stores are released in order, but the
  store->load hand-shakes of the signalling protocol need a full fence, so a wake-up can in
  theory be missed; every futex sleep here is therefore capped at 10 ms, which turns a missed
  wake-up into a delay instead of a hang.
* The futex is reached through ``ctypes`` (Linux x86-64/arm64); elsewhere waits poll.
* The GIL is held throughout (it is Python).
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import platform
import struct
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from typing_extensions import Buffer

from ._constants import (
    CONTROL_PAGE_SIZE,
    DEFAULT_SPIN_NS,
    FEAT_PENDING_SEND_SZ,
    FIN_PACKET_LEN,
    HEADER_SIZE,
    MAX_PAYLOAD,
    MIN_RING_PAGES,
    MIN_SPIN_NS,
    PAGE_SIZE,
    PIPE_PKT_DATA,
    RING_MAGIC,
    RING_VERSION,
    SPIN_ACTIVE_FACTOR,
    TRAILER_SIZE,
    VM_PKT_DATA_INBAND,
    W_BYTES_WRITTEN,
    W_CORRUPT,
    W_DATA_SEQ,
    W_DATA_SIZE,
    W_DATA_WAITERS,
    W_FEATURE_BITS,
    W_INTERRUPT_MASK,
    W_MAGIC,
    W_PENDING_SEND_SZ,
    W_READ_INDEX,
    W_RESCINDED,
    W_SPACE_SEQ,
    W_SPACE_WAITERS,
    W_SPACE_WATCHERS,
    W_VERSION,
    W_WRITE_INDEX,
    WAITSET_CAPACITY,
    WATCH_SPACE,
    WRITE_RESERVE,
    packet_len,
    roundup8,
)
from ._errors import (
    CORRUPT_DATA_SIZE,
    CORRUPT_DESC_TYPE,
    CORRUPT_IDENTITY,
    CORRUPT_INDEX_MOVED,
    CORRUPT_LEN8,
    CORRUPT_OFFSET8,
    CORRUPT_PARTIAL,
    CORRUPT_PEER,
    CORRUPT_PIPE_TYPE,
    CORRUPT_READ_INDEX,
    CORRUPT_SHORT_PACKET,
    CORRUPT_TRAILER,
    CORRUPT_WRITE_INDEX,
    ST_AGAIN,
    ST_CLOSED,
    ST_CORRUPT,
    ST_FIN_SENT,
    ST_OK,
    ST_RESCINDED,
    ST_TIMEOUT,
    status_error,
)

__all__ = [
    "Ring",
    "WaitSet",
    "atomic_fetch_or",
    "atomic_load",
    "atomic_store",
    "futex_wait",
    "futex_wake",
]

_HDR = struct.Struct("<HHHHQII")  # descriptor (type, offset8, len8, flags, trans_id) + pipe header
_TRAILER = struct.Struct("<Q")
_U32_MASK = 0xFFFFFFFF
_MAX_SLEEP_NS = 10_000_000  # see the module docstring: bounds a wake-up missed for lack of fences
_DEFAULT_SPIN_NS = int(os.environ.get("HVSOCK_RING_SPIN_NS", str(DEFAULT_SPIN_NS)))


# ---- futex through ctypes ----------------------------------------------------------------

_SYS_FUTEX: int = {"x86_64": 202, "amd64": 202, "aarch64": 98, "arm64": 98}.get(
    platform.machine().lower(), -1
)
_FUTEX_WAIT = 0
_FUTEX_WAKE = 1
_FUTEX_PRIVATE_FLAG = 128
_SYS_FUTEX_WAITV = 449 if _SYS_FUTEX >= 0 else -1  # one number on every architecture
_FUTEX2_SIZE_U32 = 0x02
_FUTEX2_PRIVATE = 128
_CLOCK_MONOTONIC = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc: Any = None
if _SYS_FUTEX >= 0:
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    except OSError:  # pragma: no cover - exotic libc
        _libc = None


def _futex_wait_addr(addr: int, expected: int, timeout_ns: int) -> int:
    """FUTEX_WAIT on an address; returns 0 or an errno. timeout_ns < 0: no limit."""
    if _libc is None:
        time.sleep(min(timeout_ns, 1_000_000) / 1e9 if timeout_ns >= 0 else 0.001)
        return 0
    ts = None
    if timeout_ns >= 0:
        ts = ctypes.byref(_Timespec(timeout_ns // 1_000_000_000, timeout_ns % 1_000_000_000))
    rc = _libc.syscall(
        ctypes.c_long(_SYS_FUTEX),
        ctypes.c_void_p(addr),
        ctypes.c_int(_FUTEX_WAIT),
        ctypes.c_uint32(expected),
        ts,
        None,
        ctypes.c_int(0),
    )
    return 0 if rc == 0 else ctypes.get_errno()


def _futex_wake_addr(addr: int, count: int) -> int:
    if _libc is None:
        return 0
    rc = _libc.syscall(
        ctypes.c_long(_SYS_FUTEX),
        ctypes.c_void_p(addr),
        ctypes.c_int(_FUTEX_WAKE),
        ctypes.c_int(count),
        None,
        None,
        ctypes.c_int(0),
    )
    return int(rc) if rc >= 0 else -ctypes.get_errno()


class _Waitv(ctypes.Structure):
    _fields_ = [
        ("val", ctypes.c_uint64),
        ("uaddr", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


def _futex_waitv_addrs(words: list[tuple[int, int, bool]], timeout_ns: int) -> None:
    """futex_waitv on (address, expected, shared) words for at most ``timeout_ns``; returns
    whatever happened (woken, a word moved, timeout, signal: the caller looks again). Without
    the syscall (or ctypes' libc): a short sleep."""
    if _libc is not None and _SYS_FUTEX_WAITV >= 0:
        vector = (_Waitv * len(words))()
        for entry, (addr, expected, shared) in zip(vector, words, strict=True):
            entry.val, entry.uaddr = expected, addr
            entry.flags = _FUTEX2_SIZE_U32 | (0 if shared else _FUTEX2_PRIVATE)
        deadline = time.clock_gettime_ns(time.CLOCK_MONOTONIC) + timeout_ns
        ts = _Timespec(deadline // 1_000_000_000, deadline % 1_000_000_000)
        rc = _libc.syscall(
            ctypes.c_long(_SYS_FUTEX_WAITV),
            vector,
            ctypes.c_uint(len(words)),
            ctypes.c_uint(0),
            ctypes.byref(ts),
            ctypes.c_int(_CLOCK_MONOTONIC),
        )
        if rc >= 0 or ctypes.get_errno() != _errno.ENOSYS:
            return
    time.sleep(min(timeout_ns, 1_000_000) / 1e9)


def _deadline(timeout: float | None) -> int:
    """None -> -1 (forever), 0 -> 0 (non-blocking), t > 0 -> absolute monotonic ns."""
    if timeout is None:
        return -1
    if timeout < 0:
        raise ValueError("timeout must be non-negative or None")
    if timeout == 0:
        return 0
    return time.monotonic_ns() + int(timeout * 1e9) + 1


def _index_ok(i: int, size: int) -> bool:
    return i < size and (i & 7) == 0


def _ring_used(w: int, r: int, size: int) -> int:
    return w - r if w >= r else size - r + w


def _ring_free(w: int, r: int, size: int) -> int:
    return size - (w - r) if w >= r else r - w


class _Status(Exception):
    """Internal: carries a failed status to Ring._fail (never escapes this module)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class Ring:
    """Pure-Python twin of :class:`ring._ring.Ring` (see there for the contract)."""

    def __init__(
        self,
        buffer: Buffer,
        *,
        initialize: bool = False,
        max_payload: int = MAX_PAYLOAD,
        spin_ns: int | None = None,
    ) -> None:
        if not 1 <= max_payload <= MAX_PAYLOAD:
            raise ValueError(f"max_payload must be in 1..{MAX_PAYLOAD}, not {max_payload}")
        spin = _DEFAULT_SPIN_NS if spin_ns is None else spin_ns
        if spin < 0:
            raise ValueError("spin_ns must be >= 0")
        mv = memoryview(buffer)
        if mv.readonly:
            mv.release()
            raise TypeError("ring buffer must be writable")
        try:
            mv = mv.cast("B")
        except TypeError:
            raise BufferError("ring buffer must be C-contiguous") from None
        length = len(mv)
        if length % PAGE_SIZE or length < MIN_RING_PAGES * PAGE_SIZE or length > (1 << 30):
            mv.release()
            raise ValueError(
                f"ring buffer must be whole 4 KiB pages, at least {MIN_RING_PAGES} pages "
                f"and at most 1 GiB; got {length} bytes"
            )
        self._mv = mv
        self._ctl = mv[:CONTROL_PAGE_SIZE].cast("I")
        # The u64 bytes_written word as one 8-byte item (aligned: one store, not two halves).
        self._written = mv[4 * W_BYTES_WRITTEN : 4 * W_BYTES_WRITTEN + 8].cast("Q")
        self._data = mv[CONTROL_PAGE_SIZE:]
        self._size = size = length - CONTROL_PAGE_SIZE
        ctl = self._ctl
        if initialize:
            mv[:CONTROL_PAGE_SIZE] = bytes(CONTROL_PAGE_SIZE)
            ctl[W_FEATURE_BITS] = FEAT_PENDING_SEND_SZ
            ctl[W_MAGIC] = RING_MAGIC
            ctl[W_VERSION] = RING_VERSION
            ctl[W_DATA_SIZE] = size
        elif (ctl[W_MAGIC], ctl[W_VERSION], ctl[W_DATA_SIZE]) != (RING_MAGIC, RING_VERSION, size):
            err = status_error(ST_CORRUPT, CORRUPT_IDENTITY, ctl[W_MAGIC], ctl[W_DATA_SIZE])
            self._release()
            raise err
        self._max_payload = min(max_payload, (size - WRITE_RESERVE) & ~7)
        self._w_local = ctl[W_WRITE_INDEX]
        self._r_local = ctl[W_READ_INDEX]
        self._total_written = self._written[0]
        self._partial = 0
        self._eof = False
        self._fin_sent = False
        self._spin_max_ns = spin
        self._spin_ns = spin
        self._corrupt_reason = 0
        self._corrupt_a = 0
        self._corrupt_b = 0
        self._busy = 0
        self._futex_words: dict[int, ctypes.c_uint32] = {}
        self._stats = dict.fromkeys(
            (
                "bytes_written",
                "bytes_read",
                "packets_written",
                "packets_read",
                "signals_sent",
                "wakes_issued",
                "sleeps",
                "spin_hits",
            ),
            0,
        )

    # -- plumbing ------------------------------------------------------------------------

    def _release(self) -> None:
        words = self.__dict__.get("_futex_words")
        if words is not None:
            words.clear()  # ctypes views export the buffer: drop them first
        for name in ("_ctl", "_written", "_data", "_mv"):
            view = self.__dict__.pop(name, None)
            if view is not None:
                view.release()

    def _fail(self, st: int, op: str) -> OSError:
        return status_error(st, self._corrupt_reason, self._corrupt_a, self._corrupt_b, op=op)

    def _check_open(self) -> None:
        if "_mv" not in self.__dict__:
            raise self._fail(ST_CLOSED, "")

    def _put(self, off: int, blob: bytes | memoryview) -> None:
        n = len(blob)
        first = self._size - off
        if n <= first:
            self._data[off : off + n] = blob
        else:
            self._data[off:] = blob[:first]
            self._data[: n - first] = blob[first:]

    def _get(self, off: int, n: int) -> bytes:
        first = self._size - off
        if n <= first:
            return bytes(self._data[off : off + n])
        return bytes(self._data[off:]) + bytes(self._data[: n - first])

    def _add(self, off: int, n: int) -> int:
        off += n
        return off - self._size if off >= self._size else off

    def _futex_addr(self, word: int) -> int:
        obj = self._futex_words.get(word)
        if obj is None:
            obj = self._futex_words[word] = ctypes.c_uint32.from_buffer(self._ctl, word * 4)
        return ctypes.addressof(obj)

    def _wake_all(self) -> None:
        ctl = self._ctl
        ctl[W_DATA_SEQ] = (ctl[W_DATA_SEQ] + 1) & _U32_MASK
        ctl[W_SPACE_SEQ] = (ctl[W_SPACE_SEQ] + 1) & _U32_MASK
        _futex_wake_addr(self._futex_addr(W_DATA_SEQ), 0x7FFFFFFF)
        _futex_wake_addr(self._futex_addr(W_SPACE_SEQ), 0x7FFFFFFF)

    def _corrupt(self, reason: int, a: int, b: int) -> _Status:
        self._corrupt_reason, self._corrupt_a, self._corrupt_b = reason, a, b
        if self._ctl[W_CORRUPT] == 0:
            self._ctl[W_CORRUPT] = reason
        self._wake_all()
        return _Status(ST_CORRUPT)

    def _flags(self) -> None:
        c = self._ctl[W_CORRUPT]
        if c:
            if self._corrupt_reason == 0:
                self._corrupt_reason, self._corrupt_a, self._corrupt_b = CORRUPT_PEER, c, 0
            raise _Status(ST_CORRUPT)

    # -- waiting -------------------------------------------------------------------------

    def _cond(self, space: bool, need: int) -> bool:
        ctl = self._ctl
        if space:
            r = ctl[W_READ_INDEX]
            if not _index_ok(r, self._size) or not _index_ok(self._w_local, self._size):
                return True
            return (
                _ring_free(self._w_local, r, self._size) >= need
                or ctl[W_RESCINDED] != 0
                or ctl[W_CORRUPT] != 0
            )
        return ctl[W_WRITE_INDEX] != self._r_local or ctl[W_RESCINDED] != 0 or ctl[W_CORRUPT] != 0

    def _wait(self, space: bool, need: int, deadline: int) -> None:
        """Same protocol as _ring._wait; raises _Status(ST_AGAIN/ST_TIMEOUT)."""
        ctl = self._ctl
        if self._cond(space, need):
            return
        if deadline == 0:
            raise _Status(ST_AGAIN)
        t0 = time.monotonic_ns()
        if 0 < deadline <= t0:
            raise _Status(ST_TIMEOUT)
        if space:
            ctl[W_PENDING_SEND_SZ] = need
        else:
            ctl[W_INTERRUPT_MASK] = 1
        if self._spin_ns > 0:
            spin_end = t0 + self._spin_ns
            if 0 < deadline < spin_end:
                spin_end = deadline
            while True:
                if self._cond(space, need):
                    self._stats["spin_hits"] += 1
                    if space:
                        ctl[W_PENDING_SEND_SZ] = 0
                    return
                if time.monotonic_ns() >= spin_end:
                    break
        seq_w, waiters_w = (W_SPACE_SEQ, W_SPACE_WAITERS) if space else (W_DATA_SEQ, W_DATA_WAITERS)
        if not space:
            ctl[W_INTERRUPT_MASK] = 0
        try:
            st = self._sleep(seq_w, waiters_w, lambda: self._cond(space, need), deadline, True)
        finally:
            if space:
                ctl[W_PENDING_SEND_SZ] = 0
        if self._spin_max_ns > 0:
            t = time.monotonic_ns() - t0
            if st == ST_OK and t <= self._spin_max_ns * SPIN_ACTIVE_FACTOR:
                self._spin_ns = self._spin_max_ns
            else:
                self._spin_ns = max(self._spin_ns // 2, MIN_SPIN_NS)
        if st != ST_OK:
            raise _Status(st)

    def _sleep(
        self, seq_w: int, count_w: int, ready: Callable[[], bool], deadline: int, counted: bool
    ) -> int:
        """Same as _ring._sleep: sleep on ``seq_w`` until ``ready()`` or the deadline, counted
        in ``count_w`` meanwhile (sleeps counted in stats when ``counted``); ST_OK/ST_TIMEOUT."""
        ctl = self._ctl
        ctl[count_w] = (ctl[count_w] + 1) & _U32_MASK
        try:
            while True:
                s = ctl[seq_w]
                if ready():
                    return ST_OK
                remaining = _MAX_SLEEP_NS
                if deadline > 0:
                    t = time.monotonic_ns()
                    if t >= deadline:
                        return ST_TIMEOUT
                    remaining = min(remaining, deadline - t)
                if counted:
                    self._stats["sleeps"] += 1
                # EINTR: Python runs signal handlers between bytecodes; just look again.
                _futex_wait_addr(self._futex_addr(seq_w), s, remaining)
        finally:
            ctl[count_w] = (ctl[count_w] - 1) & _U32_MASK

    def _watched(self, space: bool) -> bool:
        ctl = self._ctl
        w, r = ctl[W_WRITE_INDEX], ctl[W_READ_INDEX]
        if ctl[W_RESCINDED] or ctl[W_CORRUPT]:
            return True
        if not _index_ok(w, self._size) or not _index_ok(r, self._size):
            return True
        return _ring_free(w, r, self._size) >= WATCH_SPACE if space else w != r

    def _watch(self, space: bool, deadline: int) -> None:
        """Same protocol as _ring._watch (an observer's wait); raises _Status like _wait."""
        if self._watched(space):
            return
        if deadline == 0:
            raise _Status(ST_AGAIN)
        seq_w, count_w = (W_SPACE_SEQ, W_SPACE_WATCHERS) if space else (W_DATA_SEQ, W_DATA_WAITERS)
        if self._sleep(seq_w, count_w, lambda: self._watched(space), deadline, False) != ST_OK:
            raise _Status(ST_TIMEOUT)

    # -- writer --------------------------------------------------------------------------

    def _w_load(self) -> int:
        self._flags()
        ctl = self._ctl
        if ctl[W_RESCINDED]:
            raise _Status(ST_RESCINDED)
        if not _index_ok(self._w_local, self._size):
            raise self._corrupt(CORRUPT_WRITE_INDEX, self._w_local, self._size)
        w_shared = ctl[W_WRITE_INDEX]
        if w_shared != self._w_local:
            raise self._corrupt(CORRUPT_INDEX_MOVED, w_shared, self._w_local)
        r: int = ctl[W_READ_INDEX]
        if not _index_ok(r, self._size):
            raise self._corrupt(CORRUPT_READ_INDEX, r, self._size)
        return r

    def _w_put_packet(self, w: int, payload: memoryview | bytes) -> None:
        n = len(payload)
        rp = roundup8(n)
        header = _HDR.pack(VM_PKT_DATA_INBAND, 2, (HEADER_SIZE + rp) >> 3, 0, 0, PIPE_PKT_DATA, n)
        self._put(w, header + bytes(payload) + bytes(rp - n) + _TRAILER.pack(w << 32))

    def _w_publish(self, old_w: int, new_w: int) -> None:
        ctl = self._ctl
        ctl[W_WRITE_INDEX] = new_w
        self._w_local = new_w
        if ctl[W_INTERRUPT_MASK] != 0 and ctl[W_DATA_WAITERS] == 0:
            return  # reader is polling, and no observer sleeps
        if ctl[W_READ_INDEX] != old_w:
            return
        self._stats["signals_sent"] += 1
        ctl[W_DATA_SEQ] = (ctl[W_DATA_SEQ] + 1) & _U32_MASK
        if ctl[W_DATA_WAITERS] != 0:
            self._stats["wakes_issued"] += 1
            _futex_wake_addr(self._futex_addr(W_DATA_SEQ), 0x7FFFFFFF)

    def _write(self, data: Buffer, timeout: float | None, all_: bool) -> int:
        deadline = _deadline(timeout)
        self._check_open()
        with memoryview(data) as view:
            if not view.c_contiguous:
                with memoryview(view.tobytes()) as copy, copy.cast("B") as src:
                    return self._write_view(src, deadline, all_)
            with view.cast("B") as src:
                return self._write_view(src, deadline, all_)

    def _write_view(self, src: memoryview, deadline: int, all_: bool) -> int:
        n = len(src)
        done = 0
        if n == 0:
            if self._fin_sent:
                raise self._fail(ST_FIN_SENT, "write")
            return 0
        self._busy += 1
        try:
            if self._fin_sent:
                raise _Status(ST_FIN_SENT)
            while True:
                r = self._w_load()
                w = self._w_local
                free = _ring_free(w, r, self._size)
                while done < n and free > WRITE_RESERVE:
                    p = min(self._max_payload, free - WRITE_RESERVE, n - done)
                    self._w_put_packet(w, src[done : done + p])
                    old_w = w
                    w = self._add(w, packet_len(p))
                    self._w_publish(old_w, w)
                    free -= packet_len(p)
                    done += p
                    self._stats["bytes_written"] += p
                    self._stats["packets_written"] += 1
                    self._total_written += p
                    self._written[0] = self._total_written
                if done == n or (done > 0 and not all_):
                    return done
                need = packet_len(min(self._max_payload, n - done)) + FIN_PACKET_LEN + 8
                self._wait(True, need, deadline)
        except _Status as s:
            if done > 0 and not all_ and s.status != ST_CORRUPT:
                return done
            raise self._fail(s.status, "write") from None
        finally:
            self._busy -= 1

    def write(self, data: Buffer, timeout: float | None = None) -> int:
        """Write some of ``data`` (like ``socket.send``); return the count written."""
        return self._write(data, timeout, False)

    def write_all(self, data: Buffer, timeout: float | None = None) -> None:
        """Write all of ``data`` (like ``socket.sendall``)."""
        self._write(data, timeout, True)

    def fin(self, timeout: float | None = None) -> None:
        """Write the FIN (zero-length packet). Idempotent."""
        deadline = _deadline(timeout)
        self._check_open()
        self._busy += 1
        try:
            while not self._fin_sent:
                r = self._w_load()
                w = self._w_local
                if _ring_free(w, r, self._size) > FIN_PACKET_LEN:
                    self._w_put_packet(w, b"")
                    self._w_publish(w, self._add(w, FIN_PACKET_LEN))
                    self._fin_sent = True
                    self._stats["packets_written"] += 1
                    return
                self._wait(True, FIN_PACKET_LEN + 8, deadline)
        except _Status as s:
            raise self._fail(s.status, "fin") from None
        finally:
            self._busy -= 1

    # -- reader --------------------------------------------------------------------------

    def _r_load(self) -> int:
        self._flags()
        ctl = self._ctl
        if not _index_ok(self._r_local, self._size):
            raise self._corrupt(CORRUPT_READ_INDEX, self._r_local, self._size)
        r_shared = ctl[W_READ_INDEX]
        if r_shared != self._r_local:
            raise self._corrupt(CORRUPT_INDEX_MOVED, r_shared, self._r_local)
        w: int = ctl[W_WRITE_INDEX]
        if not _index_ok(w, self._size):
            raise self._corrupt(CORRUPT_WRITE_INDEX, w, self._size)
        return w

    def _r_parse(self, r: int, w: int) -> tuple[int, int]:
        used = _ring_used(w, r, self._size)
        if used < FIN_PACKET_LEN:
            raise self._corrupt(CORRUPT_SHORT_PACKET, used, r)
        header = _HDR.unpack(self._get(r, HEADER_SIZE))
        typ, offset8, len8, _flags, _trans, pkt_type, data_size = header
        if typ != VM_PKT_DATA_INBAND:
            raise self._corrupt(CORRUPT_DESC_TYPE, typ, r)
        if offset8 != 2:
            raise self._corrupt(CORRUPT_OFFSET8, offset8, r)
        body = len8 * 8
        total = body + TRAILER_SIZE
        if body < HEADER_SIZE or total > used:
            raise self._corrupt(CORRUPT_LEN8, total, used)
        if pkt_type != PIPE_PKT_DATA:
            raise self._corrupt(CORRUPT_PIPE_TYPE, pkt_type, r)
        if data_size > MAX_PAYLOAD or HEADER_SIZE + roundup8(data_size) != body:
            raise self._corrupt(CORRUPT_DATA_SIZE, data_size, body)
        (trailer,) = _TRAILER.unpack(self._get(self._add(r, body), TRAILER_SIZE))
        if trailer != r << 32:
            raise self._corrupt(CORRUPT_TRAILER, trailer, r)
        return data_size, total

    def _r_publish(self, r_old: int, r_new: int) -> None:
        ctl = self._ctl
        ctl[W_READ_INDEX] = r_new
        self._r_local = r_new
        pending = ctl[W_PENDING_SEND_SZ] & ~7
        if not ctl[W_FEATURE_BITS] & FEAT_PENDING_SEND_SZ:
            pending = 0
        watchers = ctl[W_SPACE_WATCHERS]
        if pending == 0 and watchers == 0:
            return
        w = ctl[W_WRITE_INDEX]
        if not _index_ok(w, self._size):
            return
        before = _ring_free(w, r_old, self._size)
        after = _ring_free(w, r_new, self._size)
        if not (
            (pending and before < pending <= after) or (watchers and before < WATCH_SPACE <= after)
        ):
            return
        self._stats["signals_sent"] += 1
        ctl[W_SPACE_SEQ] = (ctl[W_SPACE_SEQ] + 1) & _U32_MASK
        if watchers or ctl[W_SPACE_WAITERS] != 0:
            self._stats["wakes_issued"] += 1
            _futex_wake_addr(self._futex_addr(W_SPACE_SEQ), 0x7FFFFFFF)

    def read_into(self, buffer: Buffer, nbytes: int = 0, timeout: float | None = None) -> int:
        """Read up to ``nbytes`` (default ``len(buffer)``) into ``buffer``; 0 = EOF."""
        deadline = _deadline(timeout)
        self._check_open()
        if nbytes < 0:
            raise ValueError("negative buffersize in read_into")
        with memoryview(buffer) as view:
            if view.readonly:
                raise TypeError("read_into needs a writable buffer")
            with view.cast("B") as dst:
                return self._read_into(dst, nbytes, deadline)

    def _read_into(self, dst: memoryview, nbytes: int, deadline: int) -> int:
        n = len(dst)
        if nbytes:
            if nbytes > n:
                raise ValueError("buffer too small for requested bytes")
            n = nbytes
        if n == 0:
            return 0
        done = 0
        self._busy += 1
        try:
            while True:
                if self._eof:
                    return 0
                rescinded = self._ctl[W_RESCINDED]  # before the write index (see _ring.pyx)
                w = self._r_load()
                r = self._r_local
                if w != r:
                    break
                if rescinded:
                    return 0
                self._wait(False, 0, deadline)
            r0 = r
            failure: _Status | None = None
            while done < n and r != w:
                try:
                    ds, total = self._r_parse(r, w)
                    if ds == 0:
                        if done > 0:
                            break
                        r = self._add(r, total)
                        self._eof = True
                        self._stats["packets_read"] += 1
                        break
                    if self._partial >= ds:
                        raise self._corrupt(CORRUPT_PARTIAL, self._partial, ds)
                except _Status as s:
                    failure = s
                    break
                take = min(ds - self._partial, n - done)
                dst[done : done + take] = self._get(self._add(r, HEADER_SIZE + self._partial), take)
                self._partial += take
                done += take
                if self._partial == ds:
                    r = self._add(r, total)
                    self._partial = 0
                    self._stats["packets_read"] += 1
            self._stats["bytes_read"] += done
            if r != r0:
                self._r_publish(r0, r)
            if failure is not None and done == 0:
                raise failure
            return done
        except _Status as s:
            raise self._fail(s.status, "read") from None
        finally:
            self._busy -= 1

    def read(self, n: int = 65536, timeout: float | None = None) -> bytes:
        """Read up to ``n`` bytes and return them (b"" at EOF)."""
        if n < 0:
            raise ValueError("n must be >= 0")
        buf = bytearray(n)
        k = self.read_into(buf, 0, timeout)
        del buf[k:]
        return bytes(buf)

    # -- waiting and state ---------------------------------------------------------------

    def wait_readable(self, timeout: float | None = None) -> bool:
        """Wait until a read would not block; False on timeout."""
        deadline = _deadline(timeout)
        self._check_open()
        if self._eof:
            return True
        return self._waited(False, 0, deadline)

    def wait_writable(self, nbytes: int = 1, timeout: float | None = None) -> bool:
        """Wait until a write of ``min(nbytes, max_payload)`` bytes would not block."""
        deadline = _deadline(timeout)
        self._check_open()
        p = min(max(nbytes, 1), self._max_payload)
        return self._waited(True, packet_len(p) + FIN_PACKET_LEN + 8, deadline)

    def _waited(self, space: bool, need: int, deadline: int) -> bool:
        # Busy while waiting, as in the compiled ring: close() then refuses (EBUSY) instead
        # of releasing the memory under the wait.
        self._busy += 1
        try:
            self._wait(space, need, deadline)
        except _Status:
            return False
        finally:
            self._busy -= 1
        return True

    def watch_readable(self, timeout: float | None = None) -> bool:
        """``wait_readable`` for an observer (a thread that is not this ring's reader); it
        leaves the reader's signalling words alone. False on timeout."""
        return self._watch_for(False, timeout)

    def watch_writable(self, timeout: float | None = None) -> bool:
        """``wait_writable(1)`` for an observer (see ``watch_readable``)."""
        return self._watch_for(True, timeout)

    def _watch_for(self, space: bool, timeout: float | None) -> bool:
        deadline = _deadline(timeout)
        self._check_open()
        self._busy += 1
        try:
            self._watch(space, deadline)
        except _Status:
            return False
        finally:
            self._busy -= 1
        return True

    def readable(self) -> int:
        """Ring bytes waiting to be read (framing included)."""
        self._check_open()
        try:
            w = self._r_load()
        except _Status as s:
            raise self._fail(s.status, "readable") from None
        return _ring_used(w, self._r_local, self._size)

    def writable(self) -> int:
        """Payload bytes a write could take now without blocking."""
        self._check_open()
        if self._fin_sent:
            return 0
        try:
            r = self._w_load()
        except _Status as s:
            if s.status == ST_RESCINDED:
                return 0
            raise self._fail(s.status, "writable") from None
        free = _ring_free(self._w_local, r, self._size)
        total = 0
        while free > WRITE_RESERVE:
            p = min(free - WRITE_RESERVE, self._max_payload)
            total += p
            free -= packet_len(p)
        return total

    def rescind(self) -> None:
        """Mark the ring rescinded and wake every waiter."""
        self._check_open()
        self._ctl[W_RESCINDED] = 1
        self._wake_all()

    def close(self) -> None:
        """Release the buffer. Idempotent."""
        if self._busy:
            raise OSError(_errno.EBUSY, "ring is in use by a blocked call; rescind it first")
        self._release()

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if "_mv" in self.__dict__:
            self._release()

    @property
    def closed(self) -> bool:
        return "_mv" not in self.__dict__

    @property
    def is_rescinded(self) -> bool:
        self._check_open()
        return self._ctl[W_RESCINDED] != 0

    @property
    def at_eof(self) -> bool:
        return self._eof

    @property
    def fin_sent(self) -> bool:
        return self._fin_sent

    @property
    def data_size(self) -> int:
        return self._size

    @property
    def max_payload(self) -> int:
        return self._max_payload

    @property
    def partial(self) -> int:
        return self._partial

    def _word(self, index: int) -> int:
        self._check_open()
        return int(self._ctl[index])

    @property
    def write_index(self) -> int:
        return self._word(W_WRITE_INDEX)

    @property
    def read_index(self) -> int:
        return self._word(W_READ_INDEX)

    @property
    def interrupt_mask(self) -> int:
        return self._word(W_INTERRUPT_MASK)

    @property
    def pending_send_sz(self) -> int:
        return self._word(W_PENDING_SEND_SZ)

    @property
    def feature_bits(self) -> int:
        return self._word(W_FEATURE_BITS)

    @property
    def bytes_written_total(self) -> int:
        """The control page's bytes_written (see ring/_layout.pxd): untrusted, report only."""
        self._check_open()
        return int(self._written[0])

    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    def __repr__(self) -> str:
        if self.closed:
            return "<ring._pyring.Ring closed>"
        w, r = self.write_index, self.read_index
        return f"<ring._pyring.Ring data_size={self._size} w={w} r={r}>"


# ---- wait sets (same API as ring._ring.WaitSet) ---------------------------------------------


class WaitSet:
    """Pure-Python twin of :class:`ring._ring.WaitSet` (see there, and "Wait sets" in
    ``ring/_layout.pxd``): the same words armed the same way; sleeps capped at 10 ms like the
    twin's other waits."""

    def __init__(self) -> None:
        self._slots: list[tuple[Ring, bool, int] | None] = [None] * WAITSET_CAPACITY
        self._count = 0
        self._wake = ctypes.c_uint32(0)
        self._seen = 0

    def add(self, ring: Ring, space: bool, need: int = 0) -> int:
        ring._check_open()
        if space and not 0 < need <= ring._size:
            raise ValueError(f"need must be 1..{ring._size} bytes, not {need}")
        if self._count >= WAITSET_CAPACITY:
            raise OverflowError(f"a wait set holds at most {WAITSET_CAPACITY} waits")
        slot = self._slots.index(None)
        ctl = ring._ctl
        if space:
            ctl[W_PENDING_SEND_SZ] = need
            ctl[W_SPACE_WAITERS] = (ctl[W_SPACE_WAITERS] + 1) & _U32_MASK
        else:
            ctl[W_DATA_WAITERS] = (ctl[W_DATA_WAITERS] + 1) & _U32_MASK
        ring._busy += 1
        self._slots[slot] = (ring, bool(space), need)
        self._count += 1
        return slot

    def remove(self, slot: int) -> None:
        entry = self._slots[slot] if 0 <= slot < WAITSET_CAPACITY else None
        if entry is None:
            raise ValueError(f"no wait in slot {slot}")
        ring, space, _need = entry
        ctl = ring._ctl
        if space:
            ctl[W_PENDING_SEND_SZ] = 0
            ctl[W_SPACE_WAITERS] = (ctl[W_SPACE_WAITERS] - 1) & _U32_MASK
        else:
            ctl[W_DATA_WAITERS] = (ctl[W_DATA_WAITERS] - 1) & _U32_MASK
        ring._busy -= 1
        self._slots[slot] = None
        self._count -= 1

    def close(self) -> None:
        for slot, entry in enumerate(self._slots):
            if entry is not None:
                self.remove(slot)

    def wake(self) -> None:
        # Under the GIL the increment is not torn by another Python thread.
        self._wake.value = (self._wake.value + 1) & _U32_MASK
        if _libc is not None:
            _libc.syscall(
                ctypes.c_long(_SYS_FUTEX),
                ctypes.c_void_p(ctypes.addressof(self._wake)),
                ctypes.c_int(_FUTEX_WAKE | _FUTEX_PRIVATE_FLAG),
                ctypes.c_int(0x7FFFFFFF),
                None,
                None,
                ctypes.c_int(0),
            )

    def __len__(self) -> int:
        return self._count

    def wait(self, timeout: float | None = None) -> list[int]:
        deadline = _deadline(timeout)
        while True:
            wake = self._wake.value
            words: list[tuple[int, int, bool]] = []
            ready = []
            for slot, entry in enumerate(self._slots):
                if entry is None:
                    continue
                ring, space, need = entry
                seq_w = W_SPACE_SEQ if space else W_DATA_SEQ
                words.append((ring._futex_addr(seq_w), ring._ctl[seq_w], True))  # word first
                if ring._cond(True, need) if space else ring._watched(False):
                    ready.append(slot)
            if wake != self._seen:
                self._seen = wake
                return ready
            if ready or deadline == 0:
                return ready
            remaining = _MAX_SLEEP_NS
            if deadline > 0:
                left = deadline - time.monotonic_ns()
                if left <= 0:
                    return []
                remaining = min(remaining, left)
            words.append((ctypes.addressof(self._wake), wake, False))
            _futex_waitv_addrs(words, remaining)


# ---- word helpers (same API as ring._ring) -------------------------------------------------


def _word_view(buffer: Buffer, offset: int) -> memoryview:
    mv = memoryview(buffer).cast("B")
    if offset < 0 or offset % 4 or offset + 4 > len(mv):
        raise ValueError(f"bad word offset {offset}")
    return mv[offset : offset + 4].cast("I")


def atomic_load(buffer: Buffer, offset: int) -> int:
    """Load the u32 at ``offset`` (plain load; see the module docstring)."""
    with _word_view(buffer, offset) as w:
        return int(w[0])


def atomic_store(buffer: Buffer, offset: int, value: int) -> None:
    """Store a u32."""
    with _word_view(buffer, offset) as w:
        w[0] = value & _U32_MASK


def atomic_fetch_or(buffer: Buffer, offset: int, bits: int) -> int:
    """OR ``bits`` into the u32 (not atomic in Python; callers serialise with flock)."""
    with _word_view(buffer, offset) as w:
        old = int(w[0])
        w[0] = old | (bits & _U32_MASK)
        return old


def futex_wait(buffer: Buffer, offset: int, expected: int, timeout: float | None = None) -> bool:
    """Sleep while the u32 at ``offset`` equals ``expected``; False on timeout."""
    deadline = _deadline(timeout)
    with _word_view(buffer, offset) as w:
        word = ctypes.c_uint32.from_buffer(w)
        try:
            while True:
                if w[0] != expected:
                    return True
                if deadline == 0:
                    return False
                remaining = _MAX_SLEEP_NS
                if deadline > 0:
                    left = deadline - time.monotonic_ns()
                    if left <= 0:
                        return False
                    remaining = min(remaining, left)
                _futex_wait_addr(ctypes.addressof(word), expected, remaining)
        finally:
            del word


def futex_wake(buffer: Buffer, offset: int, count: int = 0x7FFFFFFF) -> int:
    """Wake up to ``count`` sleepers on the u32 at ``offset``."""
    with _word_view(buffer, offset) as w:
        word = ctypes.c_uint32.from_buffer(w)
        try:
            return _futex_wake_addr(ctypes.addressof(word), count)
        finally:
            del word
