"""RingWatcher: readiness callbacks for many rings from ceil(n / 127) threads."""

from __future__ import annotations

import errno
import struct
import threading
import time

import pytest

import ring
import ring._constants as C
from ring.watcher import RingWatcher, room_for

pytestmark = pytest.mark.unit


def new_ring(pages: int = 2) -> ring.Ring:
    return ring.Ring(bytearray(pages * 4096), initialize=True, spin_ns=0)


class Calls:
    def __init__(self) -> None:
        self.count = 0
        self.event = threading.Event()
        self.lock = threading.Lock()

    def __call__(self) -> None:
        with self.lock:
            self.count += 1
        self.event.set()


def until(condition: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0)  # yield: the watcher threads do the work


def test_readable_fires_once_when_data_arrives() -> None:
    watcher = RingWatcher()
    r = new_ring()
    calls = Calls()
    watch = watcher.readable(r, calls)
    assert not calls.event.wait(0.05)
    r.write(b"x")
    assert calls.event.wait(10)
    watch.cancel()  # after firing: nothing more
    r.close()  # disarmed before the callback ran
    assert calls.count == 1


def test_writable_fires_when_room_appears_and_hands_the_words_back() -> None:
    watcher = RingWatcher()
    r = new_ring()
    r.write(b"a" * r.writable())
    calls = Calls()
    watcher.writable(r, room_for(r, 4024), calls)
    until(lambda: r.pending_send_sz == room_for(r, 4024))  # armed as the writer's delegate
    assert not calls.event.is_set()
    r.read(8192, timeout=0)
    assert calls.event.wait(10)
    assert r.pending_send_sz == 0
    r.close()


def test_cancel_fires_the_callback_and_frees_the_ring() -> None:
    watcher = RingWatcher()
    r = new_ring()
    fired: list[bool] = []
    done = threading.Event()

    def callback() -> None:
        fired.append(r.readable() == 0)  # nothing arrived: it was the cancel
        r.close()  # no longer busy
        done.set()

    watch = watcher.readable(r, callback)
    until(lambda: watcher.threads == 1)
    watch.cancel()
    watch.cancel()
    assert done.wait(10)
    assert fired == [True] and r.closed


def test_a_watched_ring_is_busy() -> None:
    watcher = RingWatcher()
    buf = bytearray(2 * 4096)
    r = ring.Ring(buf, initialize=True, spin_ns=0)
    calls = Calls()
    watch = watcher.readable(r, calls)
    until(lambda: struct.unpack_from("<I", buf, C.OFF_DATA_WAITERS)[0] == 1)
    with pytest.raises(OSError) as ei:
        r.close()
    assert ei.value.errno == errno.EBUSY
    watch.cancel()
    assert calls.event.wait(10)
    assert struct.unpack_from("<I", buf, C.OFF_DATA_WAITERS)[0] == 0
    r.close()


def test_threads_grow_by_capacity_and_retire_when_idle() -> None:
    watcher = RingWatcher(idle_timeout=0.05)
    rings = [new_ring() for _ in range(C.WAITSET_CAPACITY + 10)]
    calls = Calls()
    for r in rings:
        watcher.readable(r, calls)
    assert watcher.threads == 2
    for r in rings:
        r.write(b"x")
    until(lambda: calls.count == len(rings))
    until(lambda: watcher.threads == 0)
    for r in rings:
        r.close()
