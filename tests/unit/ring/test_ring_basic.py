"""Ring behaviour in one process: framing, stream semantics, limits, waiting, errors.

Every test runs against the compiled ring and the pure-Python twin (``impl`` fixture).
"""

from __future__ import annotations

import array
import errno
import mmap
import struct
import threading
import time
from types import ModuleType

import pytest

import ring
import ring._constants as C
import ring._pyring as pyring

pytestmark = pytest.mark.unit


def test_public_constants() -> None:
    assert ring.PAGE_SIZE == ring.CONTROL_PAGE_SIZE == 4096
    assert ring.MAX_PAYLOAD == 16384
    assert ring.LINUX_GUEST_MAX_PAYLOAD == 4088
    assert [ring.packet_len(n) for n in (0, 1, 5, 8, 4088, 16384)] == [32, 40, 40, 40, 4120, 16416]
    assert ring.packet_len(1) + ring.packet_len(0) == ring.WRITE_RESERVE
    assert ring.ring_bytes(2) == 8192
    with pytest.raises(ValueError):
        ring.ring_bytes(1)
    assert ring.effective_max_payload(4096, 16384) == 4024
    assert ring.effective_max_payload(63 * 4096, 4088) == 4088
    assert ring.IMPLEMENTATION == "cython"


def test_twin_word_indices_match_the_documented_offsets() -> None:
    for name in dir(C):
        if name.startswith("OFF_"):
            assert getattr(pyring, "W_" + name[4:]) * 4 == getattr(C, name), name


def test_worked_example_bytes(new_ring) -> None:  # type: ignore[no-untyped-def]
    # hvsock-facts §3.8: "hello" at write_index 0x100 -> 40 bytes, trailer 0x100 << 32
    buf, r = new_ring(6)
    struct.pack_into("<II", buf, 0, 0x100, 0x100)
    r.close()
    r = type(r)(buf, spin_ns=0)
    assert r.write(b"hello") == 5
    pkt = bytes(buf[4096 + 0x100 : 4096 + 0x100 + 40])
    assert pkt == (
        struct.pack("<HHHHQII", 6, 2, 4, 0, 0, 1, 5)
        + b"hello\0\0\0"
        + struct.pack("<Q", 0x100 << 32)
    )
    assert r.write_index == 0x128
    r.fin()
    assert bytes(buf[4096 + 0x128 : 4096 + 0x128 + 32]) == (
        struct.pack("<HHHHQII", 6, 2, 3, 0, 0, 1, 0) + struct.pack("<Q", 0x128 << 32)
    )


def test_initialised_control_page(new_ring) -> None:  # type: ignore[no-untyped-def]
    buf, r = new_ring(3)
    words = struct.unpack_from("<4I", buf, 0)
    assert words == (0, 0, 0, 0)
    assert struct.unpack_from("<I", buf, C.OFF_FEATURE_BITS)[0] == 1
    assert struct.unpack_from("<3I", buf, C.OFF_MAGIC) == (C.RING_MAGIC, C.RING_VERSION, 8192)
    assert r.data_size == 8192 and r.feature_bits == 1
    assert (r.write_index, r.read_index, r.interrupt_mask, r.pending_send_sz) == (0, 0, 0, 0)


def test_stream_semantics_partial_reads_and_batches(new_ring) -> None:  # type: ignore[no-untyped-def]
    _buf, r = new_ring(3)
    assert r.write(b"abc") == 3
    assert r.write(b"defgh") == 5
    assert r.read(2) == b"ab"
    assert r.partial == 2
    assert r.read_index == 0  # a partly read packet is not released
    assert r.read(4) == b"cdef"  # crosses a packet boundary in one read
    assert r.read_index == ring.packet_len(3)
    assert r.read(100) == b"gh"
    assert r.read_index == r.write_index
    assert r.stats()["bytes_read"] == 8 and r.stats()["packets_read"] == 2


def test_fin_is_delivered_after_data_then_eof_forever(new_ring) -> None:  # type: ignore[no-untyped-def]
    _, r = new_ring(3)
    r.write(b"data")
    r.fin()
    r.fin()  # idempotent
    assert r.fin_sent
    assert r.read(100) == b"data"  # FIN ends the batch, data first
    assert not r.at_eof
    assert r.read(100) == b""
    assert r.at_eof
    assert r.read(100, timeout=0) == b""
    assert r.wait_readable(timeout=0)
    with pytest.raises(BrokenPipeError):
        r.write(b"more")
    with pytest.raises(BrokenPipeError):
        r.write(b"")
    assert r.writable() == 0


def test_empty_write_sends_nothing(new_ring) -> None:  # type: ignore[no-untyped-def]
    _, r = new_ring(3)
    assert r.write(b"") == 0
    assert r.write_index == 0


def test_writes_split_at_max_payload(new_ring) -> None:  # type: ignore[no-untyped-def]
    _, r = new_ring(6, max_payload=4088)
    data = bytes(range(256)) * 40  # 10240 bytes -> 4088 + 4088 + 2064
    r.write_all(data)
    assert r.stats()["packets_written"] == 3
    assert r.write_index == ring.packet_len(4088) * 2 + ring.packet_len(2064)
    out = bytearray(len(data))
    assert r.read_into(out) == len(data)
    assert out == data


def test_max_payload_is_capped_by_ring_size(new_ring) -> None:  # type: ignore[no-untyped-def]
    _, r = new_ring(2)
    assert r.max_payload == 4096 - 72
    _, r = new_ring(64)
    assert r.max_payload == 16384
    with pytest.raises(ValueError):
        new_ring(3, max_payload=16385)
    with pytest.raises(ValueError):
        new_ring(3, max_payload=0)


def test_never_full_and_fin_always_fits(new_ring) -> None:  # type: ignore[no-untyped-def]
    _, r = new_ring(2)
    total = 0
    while True:
        try:
            total += r.write(b"x" * 1000, timeout=0)
        except BlockingIOError as e:
            assert e.errno == errno.EAGAIN
            break
    assert r.writable() == 0
    free = r.data_size - r.readable()
    assert ring.FIN_PACKET_LEN < free <= ring.WRITE_RESERVE
    r.fin(timeout=0)  # room for the FIN was kept
    assert r.write_index != r.read_index  # never completely full
    got = b""
    while chunk := r.read(5000, timeout=0):
        got += chunk
    assert got == b"x" * total and r.at_eof


def test_writable_counts_multi_packet_payload(new_ring) -> None:  # type: ignore[no-untyped-def]
    _, r = new_ring(64)
    n = r.writable()
    assert n > 4 * 16384
    assert r.write(b"\0" * (n + 1000), timeout=0) == n
    assert r.writable() == 0


def test_nonblocking_and_timeouts(new_ring) -> None:  # type: ignore[no-untyped-def]
    _, r = new_ring(2)
    with pytest.raises(BlockingIOError):
        r.read(10, timeout=0)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as ei:
        r.read(10, timeout=0.05)
    assert ei.value.errno == errno.ETIMEDOUT
    assert 0.05 <= time.monotonic() - t0 < 2
    assert not r.wait_readable(timeout=0.01)
    r.write(b"y" * r.writable())
    with pytest.raises(TimeoutError):
        r.write(b"z", timeout=0.02)
    with pytest.raises(TimeoutError):
        r.write_all(b"z" * 100, timeout=0.02)
    assert not r.wait_writable(1, timeout=0.01)
    with pytest.raises(ValueError):
        r.read(1, timeout=-1)


def test_write_accepts_any_buffer(new_ring) -> None:  # type: ignore[no-untyped-def]
    _, r = new_ring(3)
    r.write_all(bytearray(b"ab"))
    r.write_all(memoryview(b"xxcdxx")[2:4])
    r.write_all(array.array("H", [0x6665]))
    r.write_all(memoryview(b"g_h_")[::2])  # not contiguous
    assert r.read(100) == b"abcdefgh"


def test_read_into_variants(new_ring) -> None:  # type: ignore[no-untyped-def]
    _, r = new_ring(3)
    r.write_all(b"0123456789")
    target = bytearray(8)
    assert r.read_into(target, 3) == 3
    assert target[:3] == b"012"
    view = memoryview(target)[4:]
    assert r.read_into(view) == 4
    assert target[4:] == b"3456"
    with pytest.raises(ValueError):
        r.read_into(bytearray(2), 5)
    with pytest.raises((TypeError, BufferError)):
        r.read_into(b"readonly")
    assert r.read_into(bytearray(0)) == 0


def test_rescind_drains_then_eof_and_breaks_writes(new_ring) -> None:  # type: ignore[no-untyped-def]
    _, r = new_ring(3)
    r.write_all(b"left over")
    r.rescind()
    assert r.is_rescinded
    with pytest.raises(BrokenPipeError) as ei:
        r.write(b"x")
    assert ei.value.errno == errno.EPIPE
    with pytest.raises(BrokenPipeError):
        r.fin()
    assert r.read(4) == b"left"
    assert r.read(100) == b" over"
    assert r.read(100) == b""
    assert r.read(100, timeout=0) == b""
    assert r.wait_readable(timeout=0) and r.wait_writable(timeout=0)


def test_a_rescind_after_the_last_packets_never_drops_them() -> None:
    """The writer's last packets, then the host's rescind, both land between the reader's
    load of the write index (empty) and its check for a rescind: the reader must still
    deliver them before EOF. Forced here on the twin (its index load is a Python method);
    the compiled ring keeps the same load order (see ring_read)."""
    buf = bytearray(3 * 4096)
    reader = pyring.Ring(buf, initialize=True, spin_ns=0)
    writer = pyring.Ring(buf, spin_ns=0)
    load = reader._r_load
    raced = []

    def load_then_race() -> int:
        w = load()
        if not raced:
            raced.append(w)
            writer.write_all(b"last words")
            writer.rescind()
        return w

    reader._r_load = load_then_race  # type: ignore[method-assign]
    assert reader.read(100, timeout=1) == b"last words"
    assert reader.read(100, timeout=0) == b""
    assert raced


def test_a_rescind_racing_the_last_packets_never_drops_them(impl: ModuleType) -> None:
    """The same race, left to threads: a writer writes then rescinds, a reader polls."""
    for _ in range(300):
        buf = bytearray(3 * 4096)
        reader = impl.Ring(buf, initialize=True, spin_ns=0)
        writer = impl.Ring(buf, spin_ns=0)
        got = bytearray()

        def read_all(r: object = reader, into: bytearray = got) -> None:
            while chunk := r.read(4096, timeout=5):  # type: ignore[attr-defined]
                into += chunk

        thread = threading.Thread(target=read_all)
        thread.start()
        writer.write_all(b"x" * 1000)
        writer.rescind()
        thread.join(10)
        assert got == b"x" * 1000


def test_close_and_buffer_checks(impl: ModuleType) -> None:
    buf = bytearray(3 * 4096)
    r = impl.Ring(buf, initialize=True)
    with pytest.raises(BufferError):
        buf.append(0)  # the ring holds the buffer while open
    r.close()
    r.close()
    assert r.closed
    buf.append(0)
    del buf[-1]
    with pytest.raises(OSError) as ei:
        r.write(b"x")
    assert ei.value.errno == errno.EBADF
    with pytest.raises(ValueError):
        impl.Ring(bytearray(4096), initialize=True)
    with pytest.raises(ValueError):
        impl.Ring(bytearray(3 * 4096 + 8), initialize=True)
    with pytest.raises((TypeError, BufferError)):
        impl.Ring(bytes(3 * 4096), initialize=True)
    with pytest.raises(ring.RingCorruptError):
        impl.Ring(bytearray(3 * 4096))  # never initialised: identity words missing
    with impl.Ring(buf) as again:  # re-attach an initialised ring
        assert again.data_size == 8192
    with pytest.raises(ring.RingCorruptError):
        impl.Ring(memoryview(buf)[: 2 * 4096])  # wrong size for this control page


def test_rings_over_mmap_interoperate_between_implementations() -> None:
    import ring._ring as cring

    mm = mmap.mmap(-1, 6 * 4096)
    w = cring.Ring(mm, initialize=True, spin_ns=0)
    rd = pyring.Ring(mm, spin_ns=0)
    w.write_all(b"from cython")
    assert rd.read(100) == b"from cython"
    rd.close()
    w.close()
    mm.close()


def test_blocked_reader_thread_is_woken_and_gil_is_released(impl: ModuleType) -> None:
    buf = bytearray(3 * 4096)
    r = impl.Ring(buf, initialize=True, spin_ns=0)
    result: list[bytes] = []
    t = threading.Thread(target=lambda: result.append(r.read(100, timeout=30)))
    t.start()
    # The reader sleeps on the futex; this thread can only get here if the GIL is free.
    while struct.unpack_from("<I", buf, C.OFF_DATA_WAITERS)[0] == 0:
        time.sleep(0)
    r.write(b"wake up")
    t.join(30)
    assert result == [b"wake up"]
    stats = r.stats()
    assert stats["sleeps"] >= 1 and stats["wakes_issued"] >= 1
    r.close()


@pytest.mark.parametrize("observed", [False, True], ids=["alone", "observed"])
def test_blocked_writer_thread_is_woken_by_space(impl: ModuleType, observed: bool) -> None:
    buf = bytearray(2 * 4096)
    r = impl.Ring(buf, initialize=True, spin_ns=0)
    r.write(b"a" * r.writable())
    done = threading.Event()

    def writer() -> None:
        r.write_all(b"b" * 3000, timeout=30)
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    while struct.unpack_from("<I", buf, C.OFF_SPACE_WAITERS)[0] == 0:
        time.sleep(0)
    assert r.pending_send_sz == ring.packet_len(3000) + 40
    assert not done.is_set()
    if observed:
        # A readiness watcher asks, waits a moment, gives up. With wait_writable(1, ...) it
        # would overwrite the writer's pending_send_sz and clear it on the way out: no reader
        # would signal the writer again.
        assert not r.watch_writable(0)
        assert not r.watch_writable(0.01)
        assert r.pending_send_sz == ring.packet_len(3000) + 40
    drained = b""
    try:
        while len(drained) < 4024 + 3000:
            drained += r.read(8192, timeout=5)  # a lost wake-up leaves the writer asleep
    finally:
        r.rescind()
        t.join(30)
    assert done.is_set()
    assert drained == b"a" * 4024 + b"b" * 3000
    assert r.pending_send_sz == 0
    r.close()


def test_busy_ring_refuses_close_until_rescinded(impl: ModuleType) -> None:
    buf = bytearray(3 * 4096)
    r = impl.Ring(buf, initialize=True, spin_ns=0)
    t = threading.Thread(target=lambda: r.read(10, timeout=30))
    t.start()
    while struct.unpack_from("<I", buf, C.OFF_DATA_WAITERS)[0] == 0:
        time.sleep(0)
    with pytest.raises(OSError) as ei:
        r.close()
    assert ei.value.errno == errno.EBUSY
    r.rescind()
    t.join(30)
    r.close()


_WAITS = {  # call -> the control word that counts it while it sleeps
    "wait_readable": C.OFF_DATA_WAITERS,
    "watch_readable": C.OFF_DATA_WAITERS,
    "wait_writable": C.OFF_SPACE_WAITERS,
    "watch_writable": C.OFF_SPACE_WATCHERS,
}


@pytest.mark.parametrize("call", sorted(_WAITS))
def test_a_waiting_call_keeps_the_ring_from_closing_until_rescinded(
    impl: ModuleType, call: str
) -> None:
    buf = bytearray(2 * 4096)
    r = impl.Ring(buf, initialize=True, spin_ns=0)
    if call.endswith("writable"):
        r.write(b"a" * r.writable())  # full; an empty ring is what readable waits on
    woke: list[bool] = []
    t = threading.Thread(target=lambda: woke.append(getattr(r, call)(timeout=30)))
    t.start()
    while struct.unpack_from("<I", buf, _WAITS[call])[0] == 0:
        time.sleep(0)
    with pytest.raises(OSError) as ei:
        r.close()
    assert ei.value.errno == errno.EBUSY
    r.rescind()
    t.join(30)
    assert woke == [True]  # a rescind ends the wait: the next call reports it
    r.close()


def test_word_helpers(impl: ModuleType) -> None:
    buf = bytearray(64)
    impl.atomic_store(buf, 8, 5)
    assert impl.atomic_fetch_or(buf, 8, 2) == 5
    assert impl.atomic_load(buf, 8) == 7
    assert impl.futex_wait(buf, 8, 1, timeout=0) is True  # value differs: no sleep
    assert impl.futex_wait(buf, 8, 7, timeout=0.01) is False
    assert impl.futex_wake(buf, 8) == 0
    with pytest.raises(ValueError):
        impl.atomic_load(buf, 62)


# -- observers (readiness watchers on threads other than the reader's and the writer's) ------


def test_an_observer_is_signalled_while_the_reader_polls(impl: ModuleType) -> None:
    buf = bytearray(2 * 4096)
    r = impl.Ring(buf, initialize=True, spin_ns=0)
    struct.pack_into("<I", buf, C.OFF_INTERRUPT_MASK, 1)  # the reader is spinning
    woke: list[bool] = []
    t = threading.Thread(target=lambda: woke.append(r.watch_readable(30)))
    t.start()
    while struct.unpack_from("<I", buf, C.OFF_DATA_WAITERS)[0] == 0:
        time.sleep(0)
    r.write(b"x")
    t.join(10)
    alive = t.is_alive()
    r.rescind()  # wake it if the write did not
    t.join(30)
    assert not alive and woke == [True]
    assert r.interrupt_mask == 1  # the reader's word is the reader's
    r.close()


def test_an_observer_is_signalled_when_room_for_a_write_appears(impl: ModuleType) -> None:
    buf = bytearray(2 * 4096)
    r = impl.Ring(buf, initialize=True, spin_ns=0)
    r.write(b"a" * r.writable())
    assert not r.watch_writable(0)
    woke: list[bool] = []
    t = threading.Thread(target=lambda: woke.append(r.watch_writable(30)))
    t.start()
    while struct.unpack_from("<I", buf, C.OFF_SPACE_WATCHERS)[0] == 0:
        time.sleep(0)
    assert r.read(8192, timeout=0) == b"a" * 4024  # the whole packet: its room is free
    t.join(10)
    alive = t.is_alive()
    r.rescind()
    t.join(30)
    assert not alive and woke == [True]
    assert r.pending_send_sz == 0  # nothing of the writer's was touched
    assert struct.unpack_from("<I", buf, C.OFF_SPACE_WATCHERS)[0] == 0
    r.close()


def test_bytes_written_counter_in_the_control_page(new_ring) -> None:  # type: ignore[no-untyped-def]
    """The writer keeps a u64 count of payload bytes in the control page (0x140), across
    wraps and across a writer that attaches again; FINs count nothing; the reader only reads."""
    buf, r = new_ring(2)  # 4 KiB of data: 10 KiB sent below wrap the ring twice
    assert r.bytes_written_total == 0
    sent = 0
    for size in (1, 1000, 4000, 3000, 2240):
        assert r.write(b"x" * size) == size
        sent += size
        assert r.bytes_written_total == sent
        assert struct.unpack_from("<Q", buf, C.OFF_BYTES_WRITTEN)[0] == sent
        assert len(r.read(65536)) == size  # the same ring's reader: room for the next write
    r.close()
    # A writer attaching to the ring goes on from the shared value (the host's relay does).
    r = type(r)(buf, spin_ns=0)
    assert r.bytes_written_total == sent
    r.write(b"y" * 10)
    r.fin()
    assert r.bytes_written_total == sent + 10
    assert r.read(100) == b"y" * 10 and r.read(100) == b""
    assert r.bytes_written_total == sent + 10
    # A value poked into the page (a corrupt or hostile writer) is only read back, never acted on.
    struct.pack_into("<Q", buf, C.OFF_BYTES_WRITTEN, 2**64 - 1)
    assert r.bytes_written_total == 2**64 - 1
    r.close()
