"""Wrap-around at every offset class, and hostile control pages / packets.

Corruption must be reported as RingCorruptError (EPROTO for indices, EBADMSG for framing) by
the end that finds it, recorded in the control page so the other end reports it too, and
never crash, hang or touch memory outside the ring (the ASan run covers the last point).
"""

from __future__ import annotations

import errno
import struct
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ring
import ring._constants as C
import ring._pyring as pyring
import ring._ring as cring

pytestmark = pytest.mark.unit

HDR = struct.Struct("<HHHHQII")


def _ring_at(impl: ModuleType, pages: int, index: int) -> tuple[bytearray, object]:
    """A fresh empty ring whose indices both sit at ``index`` (a legal empty state)."""
    buf = bytearray(pages * 4096)
    impl.Ring(buf, initialize=True).close()
    struct.pack_into("<II", buf, 0, index, index)
    return buf, impl.Ring(buf, spin_ns=0)


@pytest.mark.parametrize("back", range(8, 129, 8))
def test_wrap_at_every_offset_class(back: int) -> None:
    """Packets starting 8..128 bytes before the end: descriptor, pipe header, payload,
    padding and trailer each straddle the wrap point in turn; both twins agree."""
    size = 4096
    for n in (1, 7, 8, 9, 16, 17, 24, 40, 63, 64, 100, 129, 1000):
        bufs = []
        for impl in (cring, pyring):
            buf, r = _ring_at(impl, 2, size - back)
            payload = bytes((i * 7 + n) & 0xFF for i in range(n))
            assert r.write(payload) == n  # type: ignore[attr-defined]
            assert r.write(b"second") == 6  # type: ignore[attr-defined]
            assert r.read(n + 6) == payload + b"second"  # type: ignore[attr-defined]
            expect = (size - back + ring.packet_len(n) + ring.packet_len(6)) % size
            assert r.read_index == r.write_index == expect  # type: ignore[attr-defined]
            r.close()  # type: ignore[attr-defined]
            bufs.append(buf)
        assert bufs[0] == bufs[1]


def _poke(buf: bytearray, off: int, fmt: str, *values: int) -> None:
    struct.pack_into(fmt, buf, off, *values)


def _written(impl: ModuleType) -> tuple[bytearray, object, object]:
    """A ring with one 5-byte packet in it, plus a writer and a reader object."""
    buf = bytearray(3 * 4096)
    w = impl.Ring(buf, initialize=True, spin_ns=0)
    w.write(b"hello")
    return buf, w, impl.Ring(buf, spin_ns=0)


D = 4096  # data-area offset in the buffer

HOSTILE = {
    # name: (mutation, errno, reason)
    "write_index_unaligned": (lambda b: _poke(b, 0, "<I", 41), errno.EPROTO, 1),
    "write_index_out_of_range": (lambda b: _poke(b, 0, "<I", 8192), errno.EPROTO, 1),
    "read_index_moved_by_peer": (lambda b: _poke(b, 4, "<I", 8), errno.EPROTO, 10),
    "short_packet": (lambda b: _poke(b, 0, "<I", 16), errno.EBADMSG, 3),
    "descriptor_type": (lambda b: _poke(b, D, "<H", 7), errno.EBADMSG, 4),
    "offset8": (lambda b: _poke(b, D + 2, "<H", 3), errno.EBADMSG, 5),
    "len8_exceeds_used": (lambda b: _poke(b, D + 4, "<H", 400), errno.EBADMSG, 6),
    "len8_zero": (lambda b: _poke(b, D + 4, "<H", 0), errno.EBADMSG, 6),
    "pipe_type_partial": (lambda b: _poke(b, D + 16, "<I", 2), errno.EBADMSG, 7),
    "data_size_vs_len8": (lambda b: _poke(b, D + 20, "<I", 9), errno.EBADMSG, 8),
    "data_size_huge": (lambda b: _poke(b, D + 20, "<I", 0xFFFFFFF8), errno.EBADMSG, 8),
    "trailer": (lambda b: _poke(b, D + 32, "<Q", 8 << 32), errno.EBADMSG, 9),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_page_is_reported_on_both_ends(impl: ModuleType, case: str) -> None:
    mutate, err, reason = HOSTILE[case]
    buf, w, r = _written(impl)
    mutate(buf)
    # the reader finds it (it parses packets and owns read_index); the writer learns it
    with pytest.raises(ring.RingCorruptError) as ei:
        r.read(100)
    assert ei.value.errno == err and ei.value.reason == reason
    assert "corrupt ring" in str(ei.value)
    assert struct.unpack_from("<I", buf, C.OFF_CORRUPT)[0] == reason
    # the same end keeps failing; the other end learns from the control page
    with pytest.raises(ring.RingCorruptError):
        r.read(100)
    with pytest.raises(ring.RingCorruptError) as ei2:
        w.write(b"x", timeout=1)
    assert ei2.value.reason == 12 and str(reason) in str(ei2.value)
    assert isinstance(ei2.value, OSError)


def test_writer_rejects_bad_read_index(impl: ModuleType) -> None:
    buf, w, _ = _written(impl)
    _poke(buf, 4, "<I", 12)
    with pytest.raises(ring.RingCorruptError) as ei:
        w.write(b"x")
    assert ei.value.errno == errno.EPROTO and ei.value.reason == 2


def test_partial_packet_shrinking_is_caught(impl: ModuleType) -> None:
    buf, _w, r = _written(impl)
    assert r.read(3) == b"hel"
    _poke(buf, D + 20, "<I", 2)  # data_size 5 -> 2 (len8 still consistent: both pad to 8)
    with pytest.raises(ring.RingCorruptError) as ei:
        r.read(10)
    assert ei.value.reason == 11


def test_data_before_corruption_is_delivered_first(impl: ModuleType) -> None:
    buf, w, r = _written(impl)
    w.write(b"world")
    _poke(buf, D + 40, "<H", 9)  # second packet's type
    assert r.read(100) == b"hello"
    with pytest.raises(ring.RingCorruptError):
        r.read(100)


def test_blocked_reader_learns_about_corruption(impl: ModuleType) -> None:
    buf = bytearray(3 * 4096)
    r = impl.Ring(buf, initialize=True, spin_ns=0)
    _poke(buf, C.OFF_CORRUPT, "<I", 6)
    with pytest.raises(ring.RingCorruptError) as ei:
        r.read(1, timeout=5)
    assert ei.value.reason == 12


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    control=st.lists(st.integers(0, 2**32 - 1), min_size=4, max_size=4),
    data=st.binary(min_size=0, max_size=256),
    data_at=st.integers(0, 4095),
    writes=st.lists(st.integers(0, 5000), max_size=3),
    reads=st.lists(st.integers(1, 9000), max_size=3),
)
def test_fuzzed_control_page_never_crashes(
    control: list[int], data: bytes, data_at: int, writes: list[int], reads: list[int]
) -> None:
    """Random indices/masks and random bytes in the data area: each call returns normally
    or raises RingCorruptError / BlockingIOError; both implementations agree."""
    outcomes = []
    for impl in (cring, pyring):
        buf = bytearray(2 * 4096)
        impl.Ring(buf, initialize=True).close()
        struct.pack_into("<4I", buf, 0, *control)
        buf[D + data_at : D + data_at + len(data)] = data[: 4096 - data_at]
        results: list[object] = []
        w = impl.Ring(buf, spin_ns=0)
        rd = impl.Ring(buf, spin_ns=0)
        for n in writes:
            try:
                results.append(w.write(b"w" * n, timeout=0))
            except (ring.RingCorruptError, BlockingIOError) as e:
                results.append((type(e).__name__, e.errno))
        for n in reads:
            try:
                results.append(rd.read(n, timeout=0))
            except (ring.RingCorruptError, BlockingIOError) as e:
                results.append((type(e).__name__, e.errno))
        w.close()
        rd.close()
        outcomes.append((results, bytes(buf)))
    assert outcomes[0] == outcomes[1]
