"""Rings across processes: bulk integrity, back-pressure, timeouts, rescind latency, and
nothing left behind after ends close or die.

The peers get the segment the only way there is: its descriptor, inherited through
``subprocess.Popen(pass_fds=...)`` (or, from a peer that created it, over a socket with
SCM_RIGHTS). Processes are sequenced through pipes (stdout lines, stdin) and through the
control words in shared memory (a test waits until the peer is registered as a futex sleeper)
- never sleeps.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import socket
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
SEGMENT_LABEL = "/memfd:hvsock-channel"


#: Peers started by the running test (their pids may name files, see nothing_left).
PEER_PIDS: list[int] = []


def shm_files() -> set[str]:
    """Regular files under /dev/shm (where segments used to live)."""
    return {os.path.join(root, name) for root, _, files in os.walk("/dev/shm") for name in files}


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@pytest.fixture(autouse=True)
def nothing_left() -> Iterator[None]:
    """No test leaves a descriptor open in this process, or a file in /dev/shm named for this
    process or one of its peers (as segments and probes were: ``hvsock-PID-...``; other
    suites on this machine create files there meanwhile, so only such names count)."""
    files, fds = shm_files(), open_fds()
    PEER_PIDS.clear()
    yield
    marks = [f"-{pid}-" for pid in (os.getpid(), *PEER_PIDS)]
    ours = [f for f in shm_files() - files if any(m in os.path.basename(f) for m in marks)]
    assert sorted(ours) == [], "files appeared in /dev/shm"
    assert open_fds() == fds, "descriptors left open"


def segments_of(pid: int | str) -> set[int]:
    """Ring segments (memfd inodes) mapped by process ``pid`` (empty once it is gone)."""
    inodes = set()
    with (
        contextlib.suppress(FileNotFoundError, ProcessLookupError, PermissionError),
        open(f"/proc/{pid}/maps") as maps,
    ):
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == SEGMENT_LABEL:
                inodes.add(int(fields[4]))
    return inodes


def holders(inode: int) -> set[int]:
    """Every process on the machine that still maps ring segment ``inode``."""
    return {int(p) for p in os.listdir("/proc") if p.isdigit() and inode in segments_of(p)}


def inode_of(chan: ring.Channel) -> int:
    return os.fstat(chan.fileno()).st_ino


def peer(cmd: str, fd: int | str, *args: object) -> subprocess.Popen[str]:
    """Run ring_peer.py COMMAND FD ARGS; an int ``fd`` is handed over (same number)."""
    proc = subprocess.Popen(
        [sys.executable, PEER, cmd, str(fd), *map(str, args)],
        pass_fds=[fd] if isinstance(fd, int) else [],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    PEER_PIDS.append(proc.pid)
    return proc


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
def test_256_mib_random_sizes_sha256(pages: int) -> None:
    nbytes = 256 * MiB
    host = ring.Channel.create(pages, pages, end=None)
    writer = peer("stream-write", host.fileno(), nbytes, 11 + pages)
    reader = peer("stream-read", host.fileno(), 23 + pages)
    host.close_fd()  # each peer has its own descriptor now
    sent, sent_digest = line(writer).split()
    got, got_digest = line(reader).split()
    finish(writer)
    finish(reader)
    host.close()
    assert int(sent) == int(got) == nbytes
    assert sent_digest == got_digest


def test_back_pressure_blocks_writer_until_reader_reads() -> None:
    me = ring.Channel.create(2, 2, end=1)  # I read ring 0
    nbytes = 1 * MiB
    writer = peer("write-then-report", me.fileno(), nbytes)
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


def test_timeout_in_another_process() -> None:
    me = ring.Channel.create()
    proc = peer("timed-read", me.fileno(), 0.2)
    status, elapsed = line(proc).split()
    finish(proc)
    me.close()
    assert status == "timeout:110"
    assert 0.2 <= float(elapsed) < 5


def test_rescind_wakes_blocked_writer_and_reader_within_100ms() -> None:
    host = ring.Channel.create(3, 3, end=None)
    # end 0 of `host` fills ring 0 and blocks writing (nobody reads ring 0);
    # end 1 of `other` blocks reading its empty ring 0 (end 0 of `other` writes nothing).
    writer = peer("block-write", host.fileno())
    assert line(writer) == "ready"
    wait_word(host, 0, C.OFF_SPACE_WAITERS, 1)
    other = ring.Channel.create(3, 3, end=None)
    hold0 = peer("hold", other.fileno())  # takes end 0 of `other`, writes nothing
    assert line(hold0) == "ready"
    reader = peer("block-read", other.fileno())  # end 1 reads ring 0 of `other`: empty
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


def close_pipes(proc: subprocess.Popen[str]) -> None:
    for f in (proc.stdin, proc.stdout):
        assert f is not None
        f.close()


def test_sigkill_of_attacher_leaves_nothing() -> None:
    me = ring.Channel.create()
    inode = inode_of(me)
    proc = peer("hold", me.fileno(), "from the peer")
    assert line(proc) == "ready"
    me.close_fd()  # from here on only the two mappings hold the memory
    assert inode in segments_of(proc.pid)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    close_pipes(proc)
    assert holders(inode) == {os.getpid()}  # our mapping survives the peer ...
    assert me.recv(64, timeout=5) == b"from the peer"  # ... with what it wrote before dying
    me.sendall(b"still mapped")
    assert me.tx.readable() == ring.packet_len(len(b"still mapped"))
    me.close()
    assert holders(inode) == set()  # the last holder let go: the memory is gone


def test_sigkill_of_creator_after_attach_leaves_nothing() -> None:
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with mine:
        with theirs:
            proc = peer("create-and-hold", theirs.fileno(), "from the creator")
        mine.settimeout(30)
        _, fds, _, _ = socket.recv_fds(mine, 16, 1)
    assert len(fds) == 1, f"peer exited early with {proc.wait()}"
    try:
        me = ring.Channel.attach_fd(fds[0])
        inode = os.fstat(fds[0]).st_ino
    finally:
        os.close(fds[0])
    assert me.end == 1
    assert line(proc) == "ready"  # the creator saw us attach and wrote its message
    assert holders(inode) == {os.getpid(), proc.pid}
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    close_pipes(proc)
    assert holders(inode) == {os.getpid()}
    assert me.recv(64, timeout=5) == b"from the creator"
    me.sendall(b"still mapped")  # our ring works on: nobody reads it, nothing breaks
    assert me.tx.readable() == ring.packet_len(len(b"still mapped"))
    me.close()
    assert holders(inode) == set()


def test_sigkill_of_creator_before_handing_over_leaves_nothing() -> None:
    proc = peer("create-and-hold", "-")  # keeps the descriptor to itself
    assert line(proc) == "ready"
    [inode] = segments_of(proc.pid)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    close_pipes(proc)
    # Nothing to reap: no name was ever made, and the kernel freed the memory with the
    # process's descriptor and mapping.
    assert holders(inode) == set()
