"""Rings across processes: bulk integrity, back-pressure, timeouts, rescind latency, and
nothing left in /dev/shm after ends close or die.

Processes are sequenced through pipes (stdout lines, stdin) and through the control words in
shared memory (a test waits until the peer is registered as a futex sleeper) - never sleeps.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

import ring
import ring._constants as C
from ring._impl import atomic_load

pytestmark = pytest.mark.integration

PEER = str(pathlib.Path(__file__).with_name("ring_peer.py"))
MiB = 1 << 20


@pytest.fixture
def shm_dir() -> Iterator[str]:
    path = f"/dev/shm/hvsock-xproc-{os.getpid()}"
    os.makedirs(path, exist_ok=True)
    yield path
    leftover = os.listdir(path)
    for name in leftover:
        os.unlink(os.path.join(path, name))
    os.rmdir(path)
    assert leftover == [], f"segments left behind: {leftover}"


def peer(cmd: str, directory: str, name: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, PEER, cmd, directory, name, *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    text = proc.stdout.readline()
    assert text, f"peer exited early with {proc.wait()}"
    return text.strip()


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.close()
    assert proc.wait(timeout) == 0
    proc.stdout.close()


def word(chan: ring.Channel, ring_no: int, offset: int) -> int:
    """A control word of ring 0 or 1 of the channel, read from our own mapping."""
    pages = [r.data_size // C.PAGE_SIZE + 1 for r in chan.rings]
    base = C.PAGE_SIZE + (pages[0] * C.PAGE_SIZE if ring_no else 0)
    return atomic_load(chan._mm, base + offset)


def wait_word(chan: ring.Channel, ring_no: int, offset: int, value: int) -> None:
    deadline = time.monotonic() + 30
    while word(chan, ring_no, offset) != value:
        assert time.monotonic() < deadline, "peer never reached the expected state"
        os.sched_yield()  # the condition itself is the synchronisation


@pytest.mark.slow
@pytest.mark.parametrize("pages", [ring.MIN_RING_PAGES, ring.MAX_RING_PAGES])
def test_256_mib_random_sizes_sha256(shm_dir: str, pages: int) -> None:
    nbytes = 256 * MiB
    host = ring.Channel.create(pages, pages, end=None, directory=shm_dir)
    writer = peer("stream-write", shm_dir, host.name, nbytes, 11 + pages)
    reader = peer("stream-read", shm_dir, host.name, 23 + pages)
    sent, sent_digest = line(writer).split()
    got, got_digest = line(reader).split()
    finish(writer)
    finish(reader)
    host.close()
    assert int(sent) == int(got) == nbytes
    assert sent_digest == got_digest


def test_back_pressure_blocks_writer_until_reader_reads(shm_dir: str) -> None:
    me = ring.Channel.create(2, 2, end=1, directory=shm_dir)  # I read ring 0
    nbytes = 1 * MiB
    writer = peer("write-then-report", shm_dir, me.name, nbytes)
    wait_word(me, 0, C.OFF_SPACE_WAITERS, 1)  # writer asleep: ring 0 is full
    assert writer.poll() is None
    assert word(me, 0, C.OFF_PENDING_SEND_SZ) > 0
    w_before = me.rx.write_index
    assert me.rx.write_index == w_before  # no progress while we do not read
    got = bytearray()
    buf = bytearray(65536)
    while len(got) < nbytes:
        n = me.recv_into(buf, timeout=30)
        got += buf[:n]
    assert line(writer) == "done"
    finish(writer)
    assert got == bytes(range(256)) * (nbytes // 256)
    me.close()


def test_timeout_in_another_process(shm_dir: str) -> None:
    me = ring.Channel.create(directory=shm_dir)
    proc = peer("timed-read", shm_dir, me.name, 0.2)
    status, elapsed = line(proc).split()
    finish(proc)
    me.close()
    assert status == "timeout:110"
    assert 0.2 <= float(elapsed) < 5


def test_rescind_wakes_blocked_writer_and_reader_within_100ms(shm_dir: str) -> None:
    host = ring.Channel.create(3, 3, end=None, directory=shm_dir)
    # end 0 of `host` fills ring 0 and blocks writing (nobody reads ring 0);
    # end 1 of `other` blocks reading its empty ring 0 (end 0 of `other` writes nothing).
    writer = peer("block-write", shm_dir, host.name)
    assert line(writer) == "ready"
    wait_word(host, 0, C.OFF_SPACE_WAITERS, 1)
    other = ring.Channel.create(3, 3, end=None, directory=shm_dir)
    hold0 = peer("hold", shm_dir, other.name)  # takes end 0 of `other`, writes nothing
    assert line(hold0) == "ready"
    reader = peer("block-read", shm_dir, other.name)  # end 1 reads ring 0 of `other`: empty
    assert line(reader) == "ready"
    wait_word(other, 0, C.OFF_DATA_WAITERS, 1)
    t0 = time.monotonic()
    host.rescind()
    other.rescind()
    t_writer, outcome = line(writer).split()
    t_reader, data = line(reader).split()
    assert outcome == "EPIPE:32"
    assert data == "b''"
    assert float(t_writer) - t0 < 0.1, float(t_writer) - t0
    assert float(t_reader) - t0 < 0.1, float(t_reader) - t0
    for proc in (writer, reader, hold0):
        finish(proc)
    host.close()
    other.close()


def test_sigkill_of_attacher_leaves_nothing(shm_dir: str) -> None:
    me = ring.Channel.create(directory=shm_dir)
    proc = peer("hold", shm_dir, me.name)
    assert line(proc) == "ready"
    assert os.listdir(shm_dir) == []  # unlinked as soon as both ends mapped it
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    me.sendall(b"still mapped")  # our mapping survives the peer
    me.close()
    assert os.listdir(shm_dir) == []
    for f in (proc.stdin, proc.stdout):
        assert f is not None
        f.close()


def test_sigkill_of_creator_after_attach_leaves_nothing(shm_dir: str) -> None:
    proc = peer("create-and-hold", shm_dir, "-", "wait")
    name = line(proc)
    me = ring.Channel.attach(name, directory=shm_dir)
    assert line(proc) == "ready"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    assert os.listdir(shm_dir) == []
    me.close()
    for f in (proc.stdin, proc.stdout):
        assert f is not None
        f.close()


def test_sigkill_of_creator_before_attach_is_reaped(shm_dir: str) -> None:
    proc = peer("create-and-hold", shm_dir, "-")
    name = line(proc)
    assert line(proc) == "ready"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    assert os.listdir(shm_dir) == [name]  # nobody attached: only the reaper can know
    assert ring.reap_stale_segments(shm_dir) == [name]
    assert os.listdir(shm_dir) == []
    for f in (proc.stdin, proc.stdout):
        assert f is not None
        f.close()
