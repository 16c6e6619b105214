"""WaitSet: one thread asleep on many rings (futex_waitv), compiled and twin (``impl``).

Arming follows "Wait sets" in ring/_layout.pxd: a data wait counts itself in data_waiters (an
observer), a space wait is the writer's delegate (pending_send_sz, space_waiters); both stay
counted while armed and are uncounted by ``remove``. Tests that must see the thread asleep
before signalling look at its current system call (/proc/self/task/TID/syscall: 449 is
futex_waitv on every architecture), never at a sleep.
"""

from __future__ import annotations

import errno
import pathlib
import struct
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest

import ring._constants as C
import ring._pyring as pyring
import ring._ring as cring
from ring.watcher import room_for

pytestmark = pytest.mark.unit

SYS_FUTEX_WAITV = 449


def word(buf: bytearray, offset: int) -> int:
    return int(struct.unpack_from("<I", buf, offset)[0])


class Sleeper:
    """``wait`` on another thread; ``asleep()`` returns once it sleeps in futex_waitv."""

    def __init__(self, waits: Any, timeout: float = 30) -> None:
        self.result: list[list[int]] = []
        self._tid: int | None = None
        self._started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(waits, timeout), daemon=True)
        self.thread.start()
        self._started.wait(10)

    def _run(self, waits: Any, timeout: float) -> None:
        self._tid = threading.get_native_id()
        self._started.set()
        self.result.append(waits.wait(timeout))

    def asleep(self) -> None:
        path = pathlib.Path(f"/proc/self/task/{self._tid}/syscall")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if path.read_text().split()[0] == str(SYS_FUTEX_WAITV):
                    return
            except (OSError, IndexError):
                pass
            time.sleep(0)
        raise AssertionError("the wait set never slept in futex_waitv")

    def join(self) -> list[int]:
        self.thread.join(10)
        assert not self.thread.is_alive(), "the wait set did not wake"
        return self.result[0]


@pytest.fixture
def make(impl: ModuleType) -> Callable[..., tuple[bytearray, Any]]:
    def new(pages: int = 2) -> tuple[bytearray, Any]:
        buf = bytearray(pages * 4096)
        return buf, impl.Ring(buf, initialize=True, spin_ns=0)

    return new


def test_a_data_wait_is_an_observer_counted_while_armed(impl: ModuleType, make: Any) -> None:
    buf, r = make()
    waits = impl.WaitSet()
    slot = waits.add(r, False)
    assert len(waits) == 1
    assert word(buf, C.OFF_DATA_WAITERS) == 1
    assert word(buf, C.OFF_INTERRUPT_MASK) == 0 and word(buf, C.OFF_PENDING_SEND_SZ) == 0
    assert waits.wait(0) == []
    sleeper = Sleeper(waits)
    sleeper.asleep()
    struct.pack_into("<I", buf, C.OFF_INTERRUPT_MASK, 1)  # the reader polls: observers count
    r.write(b"x")
    assert sleeper.join() == [slot]
    assert waits.wait(0) == [slot]  # still armed until removed
    with pytest.raises(OSError) as ei:
        r.close()  # busy while armed
    assert ei.value.errno == errno.EBUSY
    waits.remove(slot)
    assert len(waits) == 0 and word(buf, C.OFF_DATA_WAITERS) == 0
    assert r.read(8, timeout=0) == b"x"
    r.close()


def test_a_space_wait_is_the_writers_delegate(impl: ModuleType, make: Any) -> None:
    buf, r = make()
    r.write(b"a" * r.writable())  # full
    need = room_for(r, 1024)
    waits = impl.WaitSet()
    slot = waits.add(r, True, need)
    assert word(buf, C.OFF_PENDING_SEND_SZ) == need
    assert word(buf, C.OFF_SPACE_WAITERS) == 1 and word(buf, C.OFF_SPACE_WATCHERS) == 0
    assert waits.wait(0) == []
    sleeper = Sleeper(waits)
    sleeper.asleep()
    assert r.read(8192, timeout=0) == b"a" * 4024  # frees the ring: crosses the threshold
    assert sleeper.join() == [slot]
    waits.remove(slot)
    assert word(buf, C.OFF_PENDING_SEND_SZ) == 0 and word(buf, C.OFF_SPACE_WAITERS) == 0
    assert r.write(b"b" * 1024, timeout=0) == 1024
    r.close()


def test_rescind_wakes_both_kinds(impl: ModuleType, make: Any) -> None:
    _, readable = make()
    _, writable = make()
    writable.write(b"a" * writable.writable())
    waits = impl.WaitSet()
    slots = {waits.add(readable, False), waits.add(writable, True, room_for(writable, 1))}
    assert waits.wait(0) == []
    sleeper = Sleeper(waits)
    sleeper.asleep()
    readable.rescind()
    writable.rescind()
    woke = set(sleeper.join())
    woke |= set(waits.wait(0))
    assert woke == slots
    waits.close()
    readable.close()
    writable.close()


def test_wake_and_timeout(impl: ModuleType, make: Any) -> None:
    _, r = make()
    waits = impl.WaitSet()
    waits.add(r, False)
    sleeper = Sleeper(waits)
    sleeper.asleep()
    waits.wake()
    assert sleeper.join() == []
    started = time.monotonic()
    assert waits.wait(0.05) == []
    assert time.monotonic() - started >= 0.05
    waits.wake()  # before the wait: it returns at once
    assert waits.wait(30) == []
    waits.close()
    r.close()


def test_the_ready_one_of_many(impl: ModuleType, make: Any) -> None:
    rings = [make() for _ in range(C.WAITSET_CAPACITY)]
    waits = impl.WaitSet()
    slots = [waits.add(r, False) for _, r in rings]
    with pytest.raises(OverflowError):
        waits.add(rings[0][1], False)
    sleeper = Sleeper(waits)
    sleeper.asleep()
    rings[100][1].write(b"x")
    assert sleeper.join() == [slots[100]]
    for slot in slots:
        waits.remove(slot)
    waits.add(rings[0][1], False)  # slots are reused
    waits.close()
    assert all(word(buf, C.OFF_DATA_WAITERS) == 0 for buf, _ in rings)
    for _, r in rings:
        r.close()


def test_bad_arguments(impl: ModuleType, make: Any) -> None:
    _, r = make()
    waits = impl.WaitSet()
    with pytest.raises(ValueError):
        waits.add(r, True, 0)
    with pytest.raises(ValueError):
        waits.add(r, True, r.data_size + 1)
    with pytest.raises(ValueError):
        waits.remove(0)
    r.close()
    with pytest.raises(OSError):
        waits.add(r, False)


@pytest.mark.parametrize("waiter", ["cython", "python"])
def test_the_twin_and_the_core_signal_each_other(waiter: str) -> None:
    # The contract is the memory: a set of one implementation is signalled by a ring of the
    # other on the same buffer.
    buf = bytearray(2 * 4096)
    waiting_impl, writing_impl = (cring, pyring) if waiter == "cython" else (pyring, cring)
    mine = waiting_impl.Ring(buf, initialize=True, spin_ns=0)
    theirs = writing_impl.Ring(buf, spin_ns=0)
    waits = waiting_impl.WaitSet()
    slot = waits.add(mine, False)
    sleeper = Sleeper(waits)
    sleeper.asleep()
    theirs.write(b"x")
    assert sleeper.join() == [slot]
    waits.close()
    mine.close()
    theirs.close()
