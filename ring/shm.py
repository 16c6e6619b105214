"""A channel: two rings (one per direction) in one shared-memory segment under ``/dev/shm``.

Segment layout (all pages 4 KiB)::

    page 0            channel header (below)
    pages 1..         ring 0: end 0 -> end 1  (control page + data pages)
    then              ring 1: end 1 -> end 0

Channel header (u32 words unless noted)::

    0x00 u64 magic b"HVSOCKCH"   0x08 version   0x0C ring0_pages   0x10 ring1_pages
    0x14 mapped_mask  bit e set once end e has mapped the segment (futex word, for wait_peer)
    0x18 creator_pid
    0x1C stalled      set by the broker (the host service) while it stalls an end: bit 2e set:
                      end e's sends wait, bit 2e+1: its receives wait (see :func:`stall_bit`);
                      bit 31 is set by rescind so a waiter never sleeps through it (futex word)

Lifetime. The segment is created with ``O_CREAT | O_EXCL | O_NOFOLLOW``, mode 0600, under an
unguessable name (``hvsock-<creator pid>-<128 random bits>``); the name is all another
process needs to attach. It is never left behind:

* the end whose attach completes ``mapped_mask`` unlinks the name at once (both ends have it
  mapped; the memory lives until the last unmap, so SIGKILL of either end afterwards leaves
  nothing in ``/dev/shm``);
* the creator unlinks on ``close()`` (and on garbage collection) if nobody attached;
* a creator killed before anyone attached leaves a name whose pid is dead:
  :func:`reap_stale_segments` removes those (the host service runs it at start-up).

Attaches are serialised with ``flock`` on the segment file, so two attachers cannot both take
the same end. ``multiprocessing.shared_memory`` is not used on purpose: on Python 3.11 it
registers even attached segments with the resource tracker, which unlinks them at exit.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import re
import secrets
import stat
import struct
import threading
import time
import weakref
from typing import TYPE_CHECKING

from ._constants import (
    DEFAULT_RECV_PAGES,
    DEFAULT_SEND_PAGES,
    MAX_PAYLOAD,
    MAX_RING_PAGES,
    MIN_RING_PAGES,
    PAGE_SIZE,
)
from ._errors import CORRUPT_IDENTITY, RingCorruptError
from ._impl import Ring, atomic_fetch_or, atomic_load, atomic_store, futex_wait, futex_wake

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["SHM_DIR", "Channel", "reap_stale_segments"]

SHM_DIR = os.environ.get("HVSOCK_SHM_DIR", "/dev/shm")
CHANNEL_MAGIC = b"HVSOCKCH"
CHANNEL_VERSION = 1
HEADER_PAGE_SIZE = PAGE_SIZE
OFF_MAGIC = 0x00
OFF_VERSION = 0x08
OFF_RING0_PAGES = 0x0C
OFF_RING1_PAGES = 0x10
OFF_MAPPED_MASK = 0x14
OFF_CREATOR_PID = 0x18
OFF_STALLED = 0x1C
BOTH_ENDS = 0b11
#: In the stalled word: the channel was rescinded (stall waiters give up and let the ring call
#: report it).
STALL_RESCINDED = 1 << 31


def stall_bit(end: int, receiving: bool) -> int:
    """The stalled-word bit that holds end ``end``'s sends (or receives)."""
    return 1 << (2 * end + int(receiving))


_NAME_RE = re.compile(r"hvsock-(\d+)-[0-9a-f]{32}")
_HEADER = struct.Struct("<8sIIIII")  # magic, version, ring0_pages, ring1_pages, mapped, pid


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _check_pages(pages: int, what: str) -> None:
    if not MIN_RING_PAGES <= pages <= MAX_RING_PAGES:
        raise ValueError(f"{what} must be {MIN_RING_PAGES}..{MAX_RING_PAGES} pages, not {pages}")


class Channel:
    """One end (0 or 1) of a two-ring channel, or the broker's view (``end=None``).

    Build with :meth:`create` or :meth:`attach`, never directly. End 0 sends on ring 0 and
    receives on ring 1; end 1 the other way round.
    """

    name: str
    path: str
    end: int | None
    is_creator: bool
    _mm: mmap.mmap
    _view: memoryview
    _slices: list[memoryview]
    _rings: tuple[Ring, Ring]
    _closed: bool
    _stall_waiters: int
    _stall_lock: threading.Lock
    _finalizer: weakref.finalize[[str], Channel] | None  # creator only: unlink on GC

    def __init__(self) -> None:
        raise TypeError("use Channel.create() or Channel.attach()")

    @classmethod
    def _from_mapping(
        cls,
        name: str,
        path: str,
        mm: mmap.mmap,
        end: int | None,
        creator: bool,
        initialize: bool,
        ring_pages: tuple[int, int],
        max_payload: int,
        spin_ns: int | None,
    ) -> Channel:
        self = cls.__new__(cls)
        self.name, self.path, self.end, self.is_creator = name, path, end, creator
        self._mm = mm
        self._view = memoryview(mm)
        self._slices = []
        rings: list[Ring] = []
        offset = HEADER_PAGE_SIZE
        try:
            for pages in ring_pages:
                part = self._view[offset : offset + pages * PAGE_SIZE]
                self._slices.append(part)
                rings.append(
                    Ring(part, initialize=initialize, max_payload=max_payload, spin_ns=spin_ns)
                )
                offset += pages * PAGE_SIZE
        except BaseException:
            self._unmap(rings)
            raise
        self._rings = (rings[0], rings[1])
        self._closed = False
        self._stall_waiters = 0
        self._stall_lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _unlink_quietly, path) if creator else None
        return self

    # -- construction --------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        send_pages: int = DEFAULT_SEND_PAGES,
        recv_pages: int = DEFAULT_RECV_PAGES,
        *,
        end: int | None = 0,
        max_payload: int = MAX_PAYLOAD,
        spin_ns: int | None = None,
        directory: str | None = None,
    ) -> Channel:
        """Create a segment. ``send_pages``/``recv_pages`` are ring 0/ring 1 sizes in pages
        (control page included; the seed's defaults are 2 and 3, the kernel's up to 64).
        ``end=None`` creates for two other processes (a broker such as the host service)."""
        _check_pages(send_pages, "send ring")
        _check_pages(recv_pages, "recv ring")
        if end not in (0, 1, None):
            raise ValueError("end must be 0, 1 or None")
        directory = SHM_DIR if directory is None else directory
        name = f"hvsock-{os.getpid()}-{secrets.token_hex(16)}"
        path = os.path.join(directory, name)
        total = HEADER_PAGE_SIZE + (send_pages + recv_pages) * PAGE_SIZE
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask said
            os.ftruncate(fd, total)
            mm = mmap.mmap(fd, total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            _unlink_quietly(path)
            raise
        finally:
            os.close(fd)
        try:
            mapped = 0 if end is None else 1 << end
            _HEADER.pack_into(
                mm, 0, CHANNEL_MAGIC, CHANNEL_VERSION, send_pages, recv_pages, mapped, os.getpid()
            )
            return cls._from_mapping(
                name, path, mm, end, True, True, (send_pages, recv_pages), max_payload, spin_ns
            )
        except BaseException:
            _unlink_quietly(path)
            mm.close()
            raise

    @classmethod
    def attach(
        cls,
        name: str,
        *,
        end: int | None = None,
        max_payload: int = MAX_PAYLOAD,
        spin_ns: int | None = None,
        directory: str | None = None,
    ) -> Channel:
        """Map an existing segment by name and take ``end`` (default: the free one)."""
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"not a channel name: {name!r}")
        if end not in (0, 1, None):
            raise ValueError("end must be 0, 1 or None")
        path = os.path.join(SHM_DIR if directory is None else directory, name)
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size < HEADER_PAGE_SIZE:
                raise RingCorruptError(CORRUPT_IDENTITY, 0, st.st_size)
            fcntl.flock(fd, fcntl.LOCK_EX)  # serialise attachers
            mm = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            try:
                magic, version, p0, p1, _mapped, _pid = _HEADER.unpack_from(mm, 0)
                if (
                    magic != CHANNEL_MAGIC
                    or version != CHANNEL_VERSION
                    or not MIN_RING_PAGES <= p0 <= MAX_RING_PAGES
                    or not MIN_RING_PAGES <= p1 <= MAX_RING_PAGES
                    or st.st_size != HEADER_PAGE_SIZE + (p0 + p1) * PAGE_SIZE
                ):
                    ident = int.from_bytes(magic[:4], "little")
                    raise RingCorruptError(CORRUPT_IDENTITY, ident, st.st_size)
                mask = atomic_load(mm, OFF_MAPPED_MASK)
                if end is None:
                    free = [e for e in (0, 1) if not mask & (1 << e)]
                    if not free:
                        raise OSError(errno.EBUSY, f"both ends of channel {name} are attached")
                    end = free[0]
                elif mask & (1 << end):
                    raise OSError(errno.EBUSY, f"end {end} of channel {name} is already attached")
                chan = cls._from_mapping(
                    name, path, mm, end, False, False, (p0, p1), max_payload, spin_ns
                )
            except BaseException:
                mm.close()
                raise
            old = atomic_fetch_or(mm, OFF_MAPPED_MASK, 1 << end)
            if (old | (1 << end)) == BOTH_ENDS:
                _unlink_quietly(path)  # both ends mapped: the name is no longer needed
            futex_wake(mm, OFF_MAPPED_MASK)
            return chan
        finally:
            # mmap keeps a dup of fd, i.e. the same open file description, so the lock
            # would outlive close(fd): release it explicitly.
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @classmethod
    def pair(
        cls,
        send_pages: int = DEFAULT_SEND_PAGES,
        recv_pages: int = DEFAULT_RECV_PAGES,
        **kwargs: int | None,
    ) -> tuple[Channel, Channel]:
        """Both ends in this process (tests, in-process transports)."""
        a = cls.create(send_pages, recv_pages, **kwargs)  # type: ignore[arg-type]
        try:
            return a, cls.attach(a.name, **kwargs)  # type: ignore[arg-type]
        except BaseException:
            a.close()
            raise

    # -- state ---------------------------------------------------------------------------

    @property
    def rings(self) -> tuple[Ring, Ring]:
        """(ring 0: end 0 -> end 1, ring 1: end 1 -> end 0)."""
        self._check_open()
        return self._rings

    @property
    def tx(self) -> Ring:
        """The ring this end writes."""
        if self.end is None:
            raise ValueError("the broker view has no tx ring; use .rings")
        return self.rings[self.end]

    @property
    def rx(self) -> Ring:
        """The ring this end reads."""
        if self.end is None:
            raise ValueError("the broker view has no rx ring; use .rings")
        return self.rings[1 - self.end]

    @property
    def mapped_mask(self) -> int:
        self._check_open()
        return atomic_load(self._mm, OFF_MAPPED_MASK)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def is_rescinded(self) -> bool:
        return any(r.is_rescinded for r in self.rings)

    def wait_peer(self, timeout: float | None = None) -> bool:
        """Wait until both ends have mapped the segment; False on timeout."""
        self._check_open()
        while True:
            mask = atomic_load(self._mm, OFF_MAPPED_MASK)
            if mask & BOTH_ENDS == BOTH_ENDS:
                return True
            if not futex_wait(self._mm, OFF_MAPPED_MASK, mask, timeout):
                return atomic_load(self._mm, OFF_MAPPED_MASK) & BOTH_ENDS == BOTH_ENDS

    # -- stalls (the host's pause / StallRing on the shared-memory path) ----------------------

    @property
    def stalled(self) -> int:
        """The stalled word: which ends' sends/receives the broker holds (:func:`stall_bit`)."""
        self._check_open()
        return atomic_load(self._mm, OFF_STALLED)

    def set_stalled(self, mask: int) -> None:
        """Broker: hold the operations in ``mask`` (0 releases all) and wake every waiter."""
        self._check_open()
        rescinded = atomic_load(self._mm, OFF_STALLED) & STALL_RESCINDED
        atomic_store(self._mm, OFF_STALLED, (mask & ~STALL_RESCINDED) | rescinded)
        futex_wake(self._mm, OFF_STALLED)

    def wait_unstalled(self, bits: int, timeout: float | None = None) -> bool:
        """Sleep while any of ``bits`` is set in the stalled word (shared futex), until the
        channel is rescinded; False on timeout."""
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._stall_lock:
            self._stall_waiters += 1  # close() refuses to unmap under a sleeper (EBUSY)
        try:
            while True:
                word = atomic_load(self._mm, OFF_STALLED)
                if not word & bits or word & STALL_RESCINDED or self.is_rescinded:
                    return True
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                futex_wait(self._mm, OFF_STALLED, word, remaining)
        finally:
            with self._stall_lock:
                self._stall_waiters -= 1

    def _check_open(self) -> None:
        if self._closed:
            raise OSError(errno.EBADF, "channel is closed")

    # -- data (socket-like names) ----------------------------------------------------------

    def send(self, data: Buffer, timeout: float | None = None) -> int:
        return self.tx.write(data, timeout)

    def sendall(self, data: Buffer, timeout: float | None = None) -> None:
        self.tx.write_all(data, timeout)

    def recv_into(self, buffer: Buffer, nbytes: int = 0, timeout: float | None = None) -> int:
        return self.rx.read_into(buffer, nbytes, timeout)

    def recv(self, n: int = 65536, timeout: float | None = None) -> bytes:
        return self.rx.read(n, timeout)

    def fin(self, timeout: float | None = None) -> None:
        """Shut down this end for writing (FIN on the tx ring)."""
        self.tx.fin(timeout)

    def rescind(self) -> None:
        """Rescind both directions: wakes every waiter; writes fail, reads drain then EOF."""
        for r in self.rings:
            r.rescind()
        atomic_fetch_or(self._mm, OFF_STALLED, STALL_RESCINDED)
        futex_wake(self._mm, OFF_STALLED)  # stall waiters too

    # -- teardown ------------------------------------------------------------------------

    def _unmap(self, rings: list[Ring] | tuple[Ring, ...]) -> None:
        for r in rings:
            r.close()
        for part in self._slices:
            part.release()
        self._slices.clear()
        self._view.release()
        self._mm.close()

    def close(self) -> None:
        """Unmap this end; the creator also unlinks the name if it is still there.
        Raises OSError(EBUSY) if a call is blocked in one of the rings (rescind first)."""
        if self._closed:
            return
        if self._stall_waiters:
            raise OSError(errno.EBUSY, "a call is waiting on the stalled word; rescind first")
        self._unmap(self._rings)
        self._closed = True
        if self._finalizer is not None:
            self._finalizer()  # unlink now (no-op if the attacher already did)

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"end={self.end}"
        return f"<ring.Channel {self.name} {state}>"


def reap_stale_segments(directory: str | None = None) -> list[str]:
    """Unlink channel segments whose creator died before anyone attached.

    A name carries its creator's pid; a segment whose creator no longer exists (in this pid
    namespace) and that is still linked was never fully attached. Returns the names removed.
    """
    directory = SHM_DIR if directory is None else directory
    removed: list[str] = []
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for name in entries:
        m = _NAME_RE.fullmatch(name)
        if m is None:
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            _unlink_quietly(os.path.join(directory, name))
            removed.append(name)
        except PermissionError:
            pass  # alive, another user's
    return removed
