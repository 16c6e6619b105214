"""A channel: two rings (one per direction) in one anonymous, sealed shared-memory file.

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

Memory. The segment is a ``memfd_create`` file: it has no name in any file system, so the only
way to reach it is to be handed its descriptor (the host service passes it with ``SCM_RIGHTS``
to the two ends and nobody else). Before the descriptor leaves the creator the file is sealed
against shrinking and growing (``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL``): no holder can
``ftruncate`` it under another's mapping, which would turn the other's next touch into SIGBUS.
:meth:`Channel.attach_fd` refuses a descriptor that is not sealed so, or whose size does not
match its header. The memory lives until the last mapping and descriptor are gone, so a
process killed at any point leaves nothing behind.

Ends are taken with an atomic fetch-or on ``mapped_mask``: two attachers can never both hold
the same end. :meth:`Channel.view_end` takes an end over an existing mapping (the host relaying
an end over its broker's mapping): no second mapping, no second descriptor. The creator keeps
its descriptor (:meth:`Channel.fileno`) until :meth:`Channel.close_fd` or :meth:`Channel.close`,
so that it can hand it over.
``multiprocessing.shared_memory`` is not used: on Python 3.11 it registers even attached
segments with the resource tracker.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
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

__all__ = ["REQUIRED_SEALS", "Channel", "sealed_memfd"]

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
#: Seals every shared segment carries before anyone but its creator sees it: its size is fixed.
REQUIRED_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


#: Guards every channel's ``_stall_waiters`` (rare: waits on a stall) and ``_share`` counts
#: (views of one mapping close on different threads); one lock for all keeps a channel small.
_STALL_LOCK = threading.Lock()
_SHARE_LOCK = threading.Lock()


def stall_bit(end: int, receiving: bool) -> int:
    """The stalled-word bit that holds end ``end``'s sends (or receives)."""
    return 1 << (2 * end + int(receiving))


_HEADER = struct.Struct("<8sIIIII")  # magic, version, ring0_pages, ring1_pages, mapped, pid


def sealed_memfd(name: str, size: int, content: bytes = b"") -> int:
    """A new anonymous file of ``size`` bytes (starting with ``content``), sealed so that its
    size can never change; returns the descriptor (close-on-exec)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        if content:
            os.pwrite(fd, content, 0)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, REQUIRED_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_sealed(fd: int) -> int:
    """The size of ``fd`` if it is a regular file sealed with :data:`REQUIRED_SEALS`; raises
    ``OSError(EPERM)`` otherwise (its holder could shrink it under our mapping)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EPERM, "not a shared-memory file")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0  # a file that cannot be sealed at all
    if seals & REQUIRED_SEALS != REQUIRED_SEALS:
        raise OSError(errno.EPERM, f"shared memory not sealed against resizing (seals {seals:#x})")
    return st.st_size


def _check_pages(pages: int, what: str) -> None:
    if not MIN_RING_PAGES <= pages <= MAX_RING_PAGES:
        raise ValueError(f"{what} must be {MIN_RING_PAGES}..{MAX_RING_PAGES} pages, not {pages}")


def segment_size(ring0_pages: int, ring1_pages: int) -> int:
    return HEADER_PAGE_SIZE + (ring0_pages + ring1_pages) * PAGE_SIZE


class Channel:
    """One end (0 or 1) of a two-ring channel, or the broker's view (``end=None``).

    Build with :meth:`create` or :meth:`attach_fd`, never directly. End 0 sends on ring 0 and
    receives on ring 1; end 1 the other way round.
    """

    # Slots: a host holds one of these per channel (and one more per end it relays).
    __slots__ = (
        "__weakref__",
        "_closed",
        "_fd",
        "_fd_finalizer",
        "_mm",
        "_rings",
        "_share",
        "_slices",
        "_stall_waiters",
        "_view",
        "end",
        "is_creator",
    )

    end: int | None
    is_creator: bool
    _fd: int | None  # creator only, until close_fd(): the descriptor to hand over
    _fd_finalizer: weakref.finalize[[int], Channel] | None
    _mm: mmap.mmap
    _view: memoryview
    _slices: list[memoryview]
    _rings: tuple[Ring, Ring]
    # Once a view of this mapping exists (view_end): [channels using the mapping], shared by
    # them; the last to close releases the memoryviews and unmaps. None: this channel alone.
    _share: list[int] | None
    _closed: bool
    _stall_waiters: int

    def __init__(self) -> None:
        raise TypeError("use Channel.create() or Channel.attach_fd()")

    @classmethod
    def _from_mapping(
        cls,
        mm: mmap.mmap,
        end: int | None,
        fd: int | None,
        initialize: bool,
        ring_pages: tuple[int, int],
        max_payload: int,
        spin_ns: int | None,
        share: Channel | None = None,
    ) -> Channel:
        self = cls.__new__(cls)
        self.end, self.is_creator, self._fd = end, fd is not None, fd
        # A creator dropped without close() still gives its descriptor back.
        self._fd_finalizer = None if fd is None else weakref.finalize(self, os.close, fd)
        self._mm = mm
        if share is None:
            self._share = None
            self._view = memoryview(mm)
            self._slices = []
            offset = HEADER_PAGE_SIZE
            for pages in ring_pages:
                self._slices.append(self._view[offset : offset + pages * PAGE_SIZE])
                offset += pages * PAGE_SIZE
        else:  # a view: one more user of ``share``'s mapping and memoryviews
            with _SHARE_LOCK:
                if share._share is None:
                    share._share = [1]
                share._share[0] += 1
                self._share = share._share
            self._view, self._slices = share._view, share._slices
        rings: list[Ring] = []
        try:
            for part in self._slices:
                rings.append(
                    Ring(part, initialize=initialize, max_payload=max_payload, spin_ns=spin_ns)
                )
        except BaseException:
            self._unmap(rings)
            raise
        self._rings = (rings[0], rings[1])
        self._closed = False
        self._stall_waiters = 0
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
    ) -> Channel:
        """Create a sealed segment. ``send_pages``/``recv_pages`` are ring 0/ring 1 sizes in
        pages (control page included; the seed's defaults are 2 and 3, the kernel's up to 64).
        ``end=None`` creates for two other processes (a broker such as the host service); hand
        them :meth:`fileno`."""
        _check_pages(send_pages, "send ring")
        _check_pages(recv_pages, "recv ring")
        if end not in (0, 1, None):
            raise ValueError("end must be 0, 1 or None")
        total = segment_size(send_pages, recv_pages)
        mapped = 0 if end is None else 1 << end
        header = _HEADER.pack(
            CHANNEL_MAGIC, CHANNEL_VERSION, send_pages, recv_pages, mapped, os.getpid()
        )
        fd = sealed_memfd("hvsock-channel", total, header)
        try:
            mm = mmap.mmap(fd, total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        try:
            return cls._from_mapping(
                mm, end, fd, True, (send_pages, recv_pages), max_payload, spin_ns
            )
        except BaseException:
            mm.close()
            os.close(fd)
            raise

    @classmethod
    def attach_fd(
        cls,
        fd: int,
        *,
        end: int | None = None,
        max_payload: int = MAX_PAYLOAD,
        spin_ns: int | None = None,
    ) -> Channel:
        """Map the segment behind ``fd`` (which stays the caller's to close) and take ``end``
        (default: the free one). Refuses a descriptor whose size is not sealed
        (``OSError(EPERM)``), a header that does not describe the file
        (:class:`RingCorruptError`) and an end already taken (``OSError(EBUSY)``)."""
        if end not in (0, 1, None):
            raise ValueError("end must be 0, 1 or None")
        size = check_sealed(fd)
        if size < HEADER_PAGE_SIZE:
            raise RingCorruptError(CORRUPT_IDENTITY, 0, size)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            magic, version, p0, p1, _mapped, _pid = _HEADER.unpack_from(mm, 0)
            if (
                magic != CHANNEL_MAGIC
                or version != CHANNEL_VERSION
                or not MIN_RING_PAGES <= p0 <= MAX_RING_PAGES
                or not MIN_RING_PAGES <= p1 <= MAX_RING_PAGES
                or size != segment_size(p0, p1)
            ):
                raise RingCorruptError(CORRUPT_IDENTITY, int.from_bytes(magic[:4], "little"), size)
            end = _take_end(mm, end)
        except BaseException:
            mm.close()
            raise
        try:
            chan = cls._from_mapping(mm, end, None, False, (p0, p1), max_payload, spin_ns)
        except BaseException:
            mm.close()
            raise
        futex_wake(mm, OFF_MAPPED_MASK)
        return chan

    def view_end(
        self, end: int, *, max_payload: int = MAX_PAYLOAD, spin_ns: int | None = None
    ) -> Channel:
        """End ``end`` over this channel's own mapping (a broker's): taken in ``mapped_mask``
        like :meth:`attach_fd`, but without a second mapping or descriptor (Python's mmap keeps
        a descriptor per mapping: a host relaying ten thousand ends would run out). The view
        has rings of its own (an end's private indices) over the same memoryviews; the memory
        stays mapped until this channel and every view of it are closed, in any order, on any
        threads."""
        if end not in (0, 1):
            raise ValueError("end must be 0 or 1")
        self._check_open()
        _take_end(self._mm, end)
        pages = (len(self._slices[0]) // PAGE_SIZE, len(self._slices[1]) // PAGE_SIZE)
        view = Channel._from_mapping(
            self._mm, end, None, False, pages, max_payload, spin_ns, share=self
        )
        futex_wake(self._mm, OFF_MAPPED_MASK)
        return view

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
            kwargs.pop("end", None)
            return a, cls.attach_fd(a.fileno(), **kwargs)  # type: ignore[arg-type]
        except BaseException:
            a.close()
            raise
        finally:
            a.close_fd()

    # -- state ---------------------------------------------------------------------------

    def fileno(self) -> int:
        """The creator's descriptor of the segment, to hand to the ends (until close_fd())."""
        if self._fd is None:
            raise OSError(errno.EBADF, "this end holds no descriptor of the segment")
        return self._fd

    def close_fd(self) -> None:
        """Drop the creator's descriptor (the mapping stays): every end has been handed one."""
        self._fd = None
        if self._fd_finalizer is not None:
            self._fd_finalizer()  # closes it, once

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
        with _STALL_LOCK:
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
            with _STALL_LOCK:
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
        if self._share is not None:
            with _SHARE_LOCK:
                self._share[0] -= 1
                if self._share[0]:
                    return  # another channel still uses the mapping
        for part in self._slices:
            part.release()
        self._slices.clear()
        self._view.release()
        self._mm.close()

    def close(self) -> None:
        """Unmap this end (the creator also drops its descriptor).
        Raises OSError(EBUSY) if a call is blocked in one of the rings (rescind first)."""
        if self._closed:
            return
        if self._stall_waiters:
            raise OSError(errno.EBUSY, "a call is waiting on the stalled word; rescind first")
        self._unmap(self._rings)
        self._closed = True
        self.close_fd()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"end={self.end}"
        return f"<ring.Channel {state}>"


def _take_end(mm: mmap.mmap, end: int | None) -> int:
    """Set this end's bit in ``mapped_mask`` (the free end's for None) atomically."""
    for candidate in (0, 1) if end is None else (end,):
        old = atomic_fetch_or(mm, OFF_MAPPED_MASK, 1 << candidate)
        if not old & (1 << candidate):
            return candidate
    if end is None:
        raise OSError(errno.EBUSY, "both ends of the channel are attached")
    raise OSError(errno.EBUSY, f"end {end} of the channel is already attached")
