"""A relayed end's byte buffers (guest_client._pipe.RelaySend and RelayReceive) against a plain
bytes model: whatever the buffer types (bytes, bytearray, memoryviews, arrays, strided views)
and sizes, a receiver's reads give back exactly the frames' bytes in order, never more than
asked for, and a sender's queue holds exactly what its writes accepted, within the credit, for
frames to take in order."""

from __future__ import annotations

import array
import threading
from typing import Any
from unittest import mock

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from guest_client import _pipe
from guest_client._pipe import RelayReceive, RelaySend

pytestmark = pytest.mark.property

KINDS = ["bytes", "bytearray", "memoryview", "array", "strided"]


def as_kind(data: bytes, kind: str) -> Any:
    """``data`` as a buffer of ``kind`` (``strided``: a non-contiguous view of it)."""
    if kind == "bytearray":
        return bytearray(data)
    if kind == "memoryview":
        return memoryview(bytearray(data))
    if kind == "array":
        return array.array("B", data)
    if kind == "strided":
        spread = bytearray(2 * len(data))
        spread[::2] = data
        return memoryview(spread)[::2]
    return data


@given(
    frames=st.lists(st.binary(min_size=1, max_size=300), max_size=12),
    reads=st.lists(
        st.tuples(st.integers(1, 400), st.sampled_from(["bytearray", "memoryview", "array"])),
        min_size=1,
        max_size=40,
    ),
    ask_less=st.booleans(),
)
def test_reads_give_back_the_frames_in_order(
    frames: list[bytes], reads: list[tuple[int, str]], ask_less: bool
) -> None:
    lock = threading.Lock()
    rx = RelayReceive(lock, lambda: None, 1 << 20)
    with lock:
        for frame in frames:
            rx.deliver(frame)
    expected = b"".join(frames)
    got = bytearray()
    for size, kind in reads:
        if len(got) == len(expected):
            break
        buffer: Any = as_kind(bytes(size), kind)
        nbytes = max(size // 2, 1) if ask_less else 0
        n = rx.read_into(buffer, nbytes, 0)
        asked = nbytes or size
        assert 0 < n <= asked
        assert n == min(asked, len(expected) - len(got))  # as much as there is, up to asked
        got += bytes(buffer)[:n]
        # Bytes beyond what was read are left as they were.
        assert bytes(buffer)[n:] == bytes(size - n)
    assert bytes(got) == expected[: len(got)]
    assert rx.readable() == len(expected) - len(got)


def _scribble(buffer: Any) -> None:
    """The program reuses its buffer once the call returned (a ``bytes`` cannot change)."""
    if isinstance(buffer, array.array):
        buffer[:] = array.array("B", b"\xee" * len(buffer))
    elif isinstance(buffer, bytearray | memoryview):
        buffer[:] = b"\xee" * len(buffer)


@given(
    ops=st.lists(
        st.one_of(
            st.tuples(
                st.just("write"), st.binary(max_size=300), st.sampled_from(KINDS), st.booleans()
            ),
            st.tuples(st.just("take"), st.integers(1, 120)),  # often inside a write's bytes
        ),
        max_size=16,
    ),
    limit=st.integers(0, 800),  # small: the writes run into it
    referenced_at=st.sampled_from([1, 64, _pipe.REFERENCED_SEND]),
)
@example(  # a frame ending inside a referenced bytes, then one taking its rest
    ops=[("write", bytes(range(100)), "bytes", True), ("take", 30), ("take", 100)],
    limit=800,
    referenced_at=1,
)
def test_writes_queue_what_they_accept_and_frames_take_it_in_order(
    ops: list[tuple[Any, ...]], limit: int, referenced_at: int
) -> None:
    """Whatever mix of referenced ``bytes`` and copied buffers the queue holds, and wherever
    frames cut it, the frames carry exactly the accepted bytes in order, within the credit,
    however the program changes its buffers after each call."""
    tx = RelaySend(threading.Lock(), lambda: None, limit, 16384)
    model, taken = b"", b""  # everything accepted, and what frames took of it
    with mock.patch.object(_pipe, "REFERENCED_SEND", referenced_at):
        for op in ops:
            if op[0] == "take":
                n = min(op[1], tx.queued)
                taken += b"".join(bytes(part) for part in tx.take(n))
                assert tx.sent == len(taken)
                continue
            _, data, kind, whole = op
            room = limit - len(model)
            buffer = as_kind(data, kind)
            if whole:
                if len(data) > room:
                    continue  # would block for credit: not what this test is about
                tx.write_all(buffer, 0)
                model += data
            elif room == 0 and data:
                with pytest.raises(BlockingIOError):
                    tx.write(buffer, 0)
            else:
                n = tx.write(buffer, 0)
                assert n == min(len(data), room)
                model += data[:n]
            _scribble(buffer)
            assert tx.accepted == len(model) <= limit
            assert tx.queued == len(model) - len(taken)
        taken += b"".join(bytes(part) for part in tx.take(tx.queued))
    assert taken == model
