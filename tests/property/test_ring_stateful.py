"""Hypothesis state machine: compiled ring == pure-Python twin == a simple model.

Random interleavings of write (random sizes, non-blocking), read (random sizes, so packets
are consumed partly), FIN and rescind run on the Cython ring, on the Python twin (each over
its own buffer) and on a model that knows nothing about bytes in memory: a queue of packets
plus the stream rules (split at max_payload, keep 72 bytes free, FIN last, partial reads,
rescind drains then EOF). After every step the two buffers must be identical byte for byte
(control page included) and the indices must be what the model predicts.
"""

from __future__ import annotations

import random
import struct
from collections import deque

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import ring
import ring._pyring as pyring
import ring._ring as cring

pytestmark = pytest.mark.property

PATTERN = random.Random(1234).randbytes(1 << 17)


def outcome(fn: object) -> object:
    """Run fn(); return its result or (exception type name, errno)."""
    try:
        return fn()  # type: ignore[operator]
    except OSError as e:
        return (type(e).__name__, e.errno)


class Model:
    """What the ring must do, in terms of packets (no memory layout)."""

    def __init__(self, size: int, max_payload: int, start: int) -> None:
        self.size = size
        self.max_payload = min(max_payload, (size - ring.WRITE_RESERVE) & ~7)
        self.w = self.r = start
        self.packets: deque[bytes | None] = deque()  # None = FIN
        self.partial = 0
        self.fin_sent = self.eof = self.rescinded = False

    def used(self) -> int:
        return sum(ring.packet_len(0 if p is None else len(p)) for p in self.packets)

    def write(self, data: bytes) -> object:
        if self.rescinded and data:
            return ("BrokenPipeError", 32)
        if self.fin_sent:
            return ("BrokenPipeError", 32)
        if not data:
            return 0
        free = self.size - self.used()
        done = 0
        while done < len(data) and free > ring.WRITE_RESERVE:
            p = min(self.max_payload, free - ring.WRITE_RESERVE, len(data) - done)
            self.packets.append(data[done : done + p])
            self.w = (self.w + ring.packet_len(p)) % self.size
            free -= ring.packet_len(p)
            done += p
        return done if done else ("BlockingIOError", 11)

    def fin(self) -> object:
        if self.fin_sent:
            return None
        if self.rescinded:
            return ("BrokenPipeError", 32)
        assert self.size - self.used() > ring.FIN_PACKET_LEN  # the reserve guarantees it
        self.packets.append(None)
        self.w = (self.w + ring.FIN_PACKET_LEN) % self.size
        self.fin_sent = True
        return None

    def read(self, n: int) -> object:
        if self.eof:
            return b""
        if not self.packets:
            return b"" if self.rescinded else ("BlockingIOError", 11)
        out = bytearray()
        while len(out) < n and self.packets:
            head = self.packets[0]
            if head is None:
                if out:
                    break
                self.packets.popleft()
                self.r = (self.r + ring.FIN_PACKET_LEN) % self.size
                self.eof = True
                break
            take = min(len(head) - self.partial, n - len(out))
            out += head[self.partial : self.partial + take]
            self.partial += take
            if self.partial == len(head):
                self.packets.popleft()
                self.partial = 0
                self.r = (self.r + ring.packet_len(len(head))) % self.size
        return bytes(out)


class RingMachine(RuleBasedStateMachine):
    @initialize(
        pages=st.sampled_from([2, 3, 6]),
        max_payload=st.sampled_from([16384, 4088, 1000, 8]),
        start=st.integers(0, 4095),
    )
    def setup(self, pages: int, max_payload: int, start: int) -> None:
        start &= ~7
        self.bufs = [bytearray(pages * 4096) for _ in range(2)]
        for buf, impl in zip(self.bufs, (cring, pyring), strict=True):
            impl.Ring(buf, initialize=True).close()
            struct.pack_into("<II", buf, 0, start, start)  # empty ring at any offset
        self.rings = [
            impl.Ring(buf, max_payload=max_payload, spin_ns=0)
            for buf, impl in zip(self.bufs, (cring, pyring), strict=True)
        ]
        self.model = Model((pages - 1) * 4096, max_payload, start)
        self.cursor = 0

    def both(self, op: str, *args: object) -> object:
        results = [outcome(lambda r=r: getattr(r, op)(*args)) for r in self.rings]
        assert results[0] == results[1], (op, args, results)
        return results[0]

    @rule(n=st.one_of(st.integers(0, 64), st.integers(0, 40000)))
    def write(self, n: int) -> None:
        start = self.cursor % (len(PATTERN) - n)
        data = PATTERN[start : start + n]
        self.cursor += 7919
        expect = self.model.write(data)
        assert self.both("write", data, 0) == expect

    @rule(n=st.one_of(st.integers(1, 64), st.integers(1, 40000)))
    def read(self, n: int) -> None:
        expect = self.model.read(n)
        assert self.both("read", n, 0) == expect

    @rule()
    def fin(self) -> None:
        expect = self.model.fin()
        assert self.both("fin", 0) == expect

    @rule()
    def rescind(self) -> None:
        self.model.rescinded = True
        self.both("rescind")

    @rule()
    def probe(self) -> None:
        assert self.both("readable") == self.model.used()
        self.both("writable")

    @invariant()
    def agree(self) -> None:
        if not hasattr(self, "rings"):
            return
        assert self.bufs[0] == self.bufs[1]
        for r in self.rings:
            assert (r.write_index, r.read_index) == (self.model.w, self.model.r)
            assert r.partial == self.model.partial
            assert r.at_eof == self.model.eof and r.fin_sent == self.model.fin_sent
        s0, s1 = (r.stats() for r in self.rings)
        assert s0 == s1

    def teardown(self) -> None:
        for r in getattr(self, "rings", []):
            r.close()


RingMachine.TestCase.settings = settings(max_examples=400, stateful_step_count=60, deadline=None)
test_ring_state_machine = RingMachine.TestCase
