"""Readiness callbacks for many rings from a few threads: a ring end with nothing to do costs no
thread of its own.

A :class:`RingWatcher` calls ``callback()`` once a ring it was given is readable
(:meth:`RingWatcher.readable`: data, EOF, rescind or corruption to report) or has room
(:meth:`RingWatcher.writable`: ``need`` free bytes, or rescinded/corrupt), or once the watch
is cancelled (:meth:`Watch.cancel`), whichever comes first: exactly once, on a watcher thread,
after the wait is disarmed. The callback must be short and must not block (hand the work to
another thread); it finds out itself which of the three happened.

Threads. Each watcher thread owns one :class:`ring.WaitSet` (up to ``WAITSET_CAPACITY`` = 127
waits, one ``futex_waitv`` sleep for all of them). A new watch goes to the first thread with a
free slot, or starts a thread; a thread with no watch for ``idle_timeout`` seconds ends. So
*n* watched rings cost ``ceil(n / 127)`` sleeping threads.

Hand-over. A readable watch waits as an observer of the ring; a writable watch waits as the
delegate of the ring's writer (it sets the writer's ``pending_send_sz``), so the writer must
make no call on that ring from ``writable()`` until its callback has run. Adding and cancelling
go through the thread's request list (the owner thread alone touches its ``WaitSet``) and a
``WaitSet.wake()``.

Lifetime. While watched, a ring is busy (its ``close()`` refuses with EBUSY): close it after
the callback has run, e.g. cancel first and close from the callback or after it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ._constants import FIN_PACKET_LEN, WAITSET_CAPACITY, packet_len
from ._impl import WaitSet

if TYPE_CHECKING:
    from ._impl import Ring

__all__ = ["IDLE_TIMEOUT", "RingWatcher", "Watch", "room_for"]

log = logging.getLogger("hvsock.ring.watcher")

#: Seconds a watcher thread with no watch waits for one before it ends.
IDLE_TIMEOUT = 2.0


def room_for(ring: Ring, nbytes: int) -> int:
    """Free ring bytes a write of ``min(nbytes, max_payload)`` bytes waits for (what
    ``Ring.wait_writable(nbytes)`` waits for): the ``need`` of :meth:`RingWatcher.writable`."""
    return packet_len(min(max(nbytes, 1), ring.max_payload)) + FIN_PACKET_LEN + 8


class Watch:
    """One pending callback (see :class:`RingWatcher`)."""

    __slots__ = ("_callback", "_cancelled", "_fired", "_group", "_need", "_ring", "_slot")

    def __init__(self, ring: Ring, need: int, callback: Callable[[], object]) -> None:
        self._ring: Ring | None = ring
        self._need = need  # 0: readable
        self._callback: Callable[[], object] | None = callback
        self._group: _Group | None = None
        self._slot = -1  # in its group's WaitSet, while armed
        self._cancelled = False
        self._fired = False  # touched by the group's thread only

    def cancel(self) -> None:
        """Have the callback run now (on the watcher thread) if it has not yet; idempotent."""
        group = self._group
        if group is not None:
            group.request_cancel(self)


class _Group:
    """One watcher thread and its WaitSet."""

    def __init__(self, owner: RingWatcher) -> None:
        self.owner = owner
        self.waits = WaitSet()
        self.load = 0  # watches given to this group and not yet fired (owner's lock)
        self._lock = threading.Lock()
        self._adds: list[Watch] = []
        self._cancels: list[Watch] = []
        self._armed: dict[int, Watch] = {}  # slot -> watch (the thread's own)
        self.thread = threading.Thread(target=self._run, name="hvsock-ring-watcher", daemon=True)

    def request_add(self, watch: Watch) -> None:
        with self._lock:
            self._adds.append(watch)
        self.waits.wake()

    def request_cancel(self, watch: Watch) -> None:
        with self._lock:
            if watch._cancelled:
                return
            watch._cancelled = True
            self._cancels.append(watch)
        self.waits.wake()

    def _fire(self, watch: Watch) -> None:
        if watch._fired:
            return
        watch._fired = True
        callback, watch._callback, watch._ring = watch._callback, None, None
        self.owner._fired(self)
        try:
            if callback is not None:
                callback()
        except Exception:  # one watch's trouble must not stop the others'
            log.exception("ring watch callback failed")

    def _take_requests(self) -> None:
        with self._lock:
            adds, self._adds = self._adds, []
            cancels, self._cancels = self._cancels, []
        for watch in adds:
            ring = watch._ring
            if watch._cancelled or ring is None:
                self._fire(watch)
                continue
            try:
                watch._slot = self.waits.add(ring, watch._need > 0, watch._need)
            except (OSError, ValueError):
                self._fire(watch)  # closed, or a need it can never meet: let the caller see
                continue
            self._armed[watch._slot] = watch
        for watch in cancels:
            if watch._fired:
                continue
            if watch._slot >= 0:
                self._armed.pop(watch._slot, None)
                self.waits.remove(watch._slot)
            self._fire(watch)

    def _run(self) -> None:
        idle_timeout = self.owner.idle_timeout
        idle_since: float | None = None
        try:
            while True:
                self._take_requests()
                if self._armed:
                    idle_since = None
                elif idle_since is None:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since >= idle_timeout and self.owner._retire(self):
                    return
                ready = self.waits.wait(None if self._armed else idle_timeout)
                for slot in ready:
                    watch = self._armed.pop(slot)
                    self.waits.remove(slot)  # disarmed before the callback: see the module doc
                    self._fire(watch)
        finally:
            self.waits.close()


class RingWatcher:
    """Callbacks on ring readiness for any number of rings (see the module docstring)."""

    def __init__(self, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.idle_timeout = idle_timeout
        self._lock = threading.Lock()
        self._groups: list[_Group] = []

    def readable(self, ring: Ring, callback: Callable[[], object]) -> Watch:
        """Call ``callback`` once ``ring`` would not block a read (or on cancel)."""
        return self._watch(Watch(ring, 0, callback))

    def writable(self, ring: Ring, need: int, callback: Callable[[], object]) -> Watch:
        """Call ``callback`` once ``ring`` has ``need`` free bytes (:func:`room_for`), or is
        rescinded or corrupt (or on cancel). The ring's writer hands its waiting over: it
        makes no call on ``ring`` until the callback has run."""
        if need <= 0:
            raise ValueError("need must be positive")
        return self._watch(Watch(ring, need, callback))

    @property
    def threads(self) -> int:
        """Watcher threads running now."""
        with self._lock:
            return len(self._groups)

    def _watch(self, watch: Watch) -> Watch:
        start = None
        with self._lock:
            for group in self._groups:
                if group.load < WAITSET_CAPACITY:
                    break
            else:
                group = start = _Group(self)
                self._groups.append(group)
            group.load += 1
            watch._group = group
        group.request_add(watch)
        if start is not None:
            start.thread.start()
        return watch

    def _fired(self, group: _Group) -> None:
        with self._lock:
            group.load -= 1

    def _retire(self, group: _Group) -> bool:
        """The group's thread has nothing armed: may it end? Not while a watch is on its way
        (``load`` counts watches given to it and not fired)."""
        with self._lock:
            if group.load:
                return False
            self._groups.remove(group)
            return True
