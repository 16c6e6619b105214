"""The shared-memory channel in one process: naming, modes, attach handshake, unlinking."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from collections.abc import Iterator

import pytest

import ring
from ring.shm import OFF_MAPPED_MASK

pytestmark = pytest.mark.unit


@pytest.fixture
def shm_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private directory on tmpfs when possible (same semantics as /dev/shm)."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        path = os.path.join("/dev/shm", f"hvsock-test-{os.getpid()}")
        os.makedirs(path, exist_ok=True)
        yield path
        leftover = os.listdir(path)
        for name in leftover:
            os.unlink(os.path.join(path, name))
        os.rmdir(path)
        assert leftover == [], "segments left behind"
    else:  # pragma: no cover
        yield str(tmp_path_factory.mktemp("shm"))


def test_create_names_mode_and_unlink_after_attach(shm_dir: str) -> None:
    a = ring.Channel.create(directory=shm_dir)
    path = os.path.join(shm_dir, a.name)
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == 4096 * (1 + 2 + 3)
    assert a.name.startswith(f"hvsock-{os.getpid()}-") and len(a.name.split("-")[2]) == 32
    assert a.mapped_mask == 0b01 and not a.wait_peer(timeout=0.01)
    b = ring.Channel.attach(a.name, directory=shm_dir)
    assert os.listdir(shm_dir) == []  # both ends mapped: the name is gone
    assert a.wait_peer(timeout=1) and b.end == 1 and a.end == 0
    assert (a.tx.data_size, a.rx.data_size) == (4096, 8192)
    assert (b.tx.data_size, b.rx.data_size) == (8192, 4096)
    a.sendall(b"ping")
    assert b.recv(10) == b"ping"
    b.sendall(b"pong")
    assert a.recv(10) == b"pong"
    b.fin()
    assert a.recv(10) == b""
    a.close()
    b.close()
    a.close()
    assert a.closed


def test_creator_close_unlinks_when_nobody_attached(shm_dir: str) -> None:
    a = ring.Channel.create(6, 6, directory=shm_dir)
    assert os.listdir(shm_dir) == [a.name]
    a.close()
    assert os.listdir(shm_dir) == []
    with pytest.raises(FileNotFoundError):
        ring.Channel.attach(a.name, directory=shm_dir)


def test_garbage_collected_creator_unlinks(shm_dir: str) -> None:
    a = ring.Channel.create(directory=shm_dir)
    name = a.name
    del a
    assert name not in os.listdir(shm_dir)


def test_attach_rejects_bad_names_taken_ends_and_bad_sizes(shm_dir: str) -> None:
    with pytest.raises(ValueError):
        ring.Channel.attach("../etc/passwd", directory=shm_dir)
    with pytest.raises(ValueError):
        ring.Channel.create(1, 3, directory=shm_dir)
    with pytest.raises(ValueError):
        ring.Channel.create(2, 65, directory=shm_dir)
    a = ring.Channel.create(directory=shm_dir)
    with pytest.raises(OSError) as ei:
        ring.Channel.attach(a.name, end=0, directory=shm_dir)
    assert ei.value.errno == errno.EBUSY
    # a truncated segment is refused with a clear error
    path = os.path.join(shm_dir, a.name)
    os.truncate(path, 4096 * 3)
    with pytest.raises(ring.RingCorruptError):
        ring.Channel.attach(a.name, directory=shm_dir)
    a.close()


def test_broker_creates_for_two_other_ends(shm_dir: str) -> None:
    host = ring.Channel.create(64, 64, end=None, directory=shm_dir)
    with pytest.raises(ValueError):
        _ = host.tx
    e0 = ring.Channel.attach(host.name, directory=shm_dir)
    assert os.listdir(shm_dir) == [host.name]
    e1 = ring.Channel.attach(host.name, directory=shm_dir)
    assert (e0.end, e1.end) == (0, 1) and os.listdir(shm_dir) == []
    e0.sendall(b"x" * 100000)
    got = b""
    while len(got) < 100000:
        got += e1.recv(65536)
    assert got == b"x" * 100000
    host.rescind()  # the host tears the channel down: both ends see it
    assert e0.is_rescinded and e1.is_rescinded
    with pytest.raises(BrokenPipeError):
        e1.send(b"x")
    assert e0.recv(10) == b""
    for c in (e0, e1, host):
        c.close()


def test_reap_stale_segments(shm_dir: str) -> None:
    # a creator that dies before anyone attaches leaves its name behind ...
    code = (
        "import ring, sys; c = ring.Channel.create(directory=sys.argv[1]); print(c.name); "
        "import os; os._exit(0)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, shm_dir], check=True, capture_output=True, text=True
    )
    name = out.stdout.strip()
    mine = ring.Channel.create(directory=shm_dir)
    assert sorted(os.listdir(shm_dir)) == sorted([name, mine.name])
    # ... and the reaper removes exactly those whose creator is gone
    assert ring.reap_stale_segments(shm_dir) == [name]
    assert os.listdir(shm_dir) == [mine.name]
    mine.close()


def test_mapped_mask_offset_is_in_header(shm_dir: str) -> None:
    a, b = ring.Channel.pair(directory=shm_dir)
    assert OFF_MAPPED_MASK == 0x14 and a.mapped_mask == b.mapped_mask == 3
    a.close()
    b.close()
