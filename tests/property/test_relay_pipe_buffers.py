"""A relayed end's byte buffers (guest_client._pipe.RelaySend and RelayReceive) against a plain
bytes model: whatever the buffer types (bytes, bytearray, memoryviews, arrays, strided views)
and sizes, a receiver's reads give back exactly the frames' bytes in order, never more than
asked for, and a sender's buffer holds exactly what its writes accepted, within the credit."""

from __future__ import annotations

import array
import threading
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

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


@given(
    writes=st.lists(
        st.tuples(st.binary(max_size=300), st.sampled_from(KINDS), st.booleans()), max_size=12
    ),
    limit=st.integers(0, 400),  # small: the writes run into it
)
def test_writes_buffer_what_they_accept_within_the_credit(
    writes: list[tuple[bytes, str, bool]], limit: int
) -> None:
    lock = threading.Lock()
    tx = RelaySend(lock, lambda: None, limit, 16384)
    model = b""
    for data, kind, whole in writes:
        room = limit - len(model)
        if whole:
            if len(data) > room:
                continue  # would block for credit: not what this test is about
            tx.write_all(as_kind(data, kind), 0)
            model += data
        elif room == 0 and data:
            with pytest.raises(BlockingIOError):
                tx.write(as_kind(data, kind), 0)
        else:
            n = tx.write(as_kind(data, kind), 0)
            assert n == min(len(data), room)
            model += data[:n]
        assert bytes(tx.buffer) == model
        assert tx.accepted == len(model) <= limit
