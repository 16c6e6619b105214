"""The shared-memory channel in one process: an anonymous sealed memfd, handed over by
descriptor; attach checks (seals, header, ends); nothing left behind."""

from __future__ import annotations

import errno
import fcntl
import gc
import os
import tempfile

import pytest

import ring
from ring import shm
from ring.shm import OFF_MAPPED_MASK, REQUIRED_SEALS

pytestmark = pytest.mark.unit

SEGMENT_LABEL = "/memfd:hvsock-channel"


def shm_entries() -> set[str]:
    """Everything under /dev/shm (a segment used to be a file there)."""
    found = set()
    for root, dirs, files in os.walk("/dev/shm"):
        found.update(os.path.join(root, n) for n in (*dirs, *files))
    return found


def new_shm_files(before: set[str], *pids: int) -> list[str]:
    """Files that appeared in /dev/shm since ``before`` and carry one of ``pids`` (this
    process's by default) in their name, as the old segment and probe names did
    (``hvsock-PID-...``). Other suites on this machine create files there meanwhile."""
    marks = [f"-{pid}-" for pid in (os.getpid(), *pids)]
    return sorted(
        p
        for p in shm_entries() - before
        if os.path.isfile(p) and any(m in os.path.basename(p) for m in marks)
    )


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def mappings_of(inode: int, pid: int | str = "self") -> list[str]:
    """The address ranges of process ``pid`` that map ring segment ``inode``."""
    ranges = []
    try:
        with open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and fields[4] == str(inode) and fields[5] == SEGMENT_LABEL:
                    ranges.append(fields[0])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass  # gone meanwhile (or not ours to read)
    return ranges


def test_create_is_an_anonymous_sealed_memfd() -> None:
    before = shm_entries()
    a = ring.Channel.create()
    fd = a.fileno()
    st = os.fstat(fd)
    assert st.st_size == 4096 * (1 + 2 + 3)
    assert st.st_nlink == 0  # no name in any file system
    assert os.readlink(f"/proc/self/fd/{fd}") == f"{SEGMENT_LABEL} (deleted)"
    assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC  # children get it only if handed it
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & REQUIRED_SEALS == REQUIRED_SEALS
    assert new_shm_files(before) == []
    assert a.is_creator and a.mapped_mask == 0b01 and not a.wait_peer(timeout=0.01)
    b = ring.Channel.attach_fd(fd)
    assert not b.is_creator
    with pytest.raises(OSError) as ei:
        b.fileno()  # an attacher holds no descriptor of its own to hand on
    assert ei.value.errno == errno.EBADF
    assert a.wait_peer(timeout=1) and b.end == 1 and a.end == 0
    assert (a.tx.data_size, a.rx.data_size) == (4096, 8192)
    assert (b.tx.data_size, b.rx.data_size) == (8192, 4096)
    a.sendall(b"ping")
    assert b.recv(10) == b"ping"
    b.sendall(b"pong")
    assert a.recv(10) == b"pong"
    b.fin()
    assert a.recv(10) == b""
    assert new_shm_files(before) == []
    a.close()
    b.close()
    a.close()
    assert a.closed


def test_size_is_sealed_against_every_holder() -> None:
    a = ring.Channel.create(6, 6)
    fd = a.fileno()
    size = os.fstat(fd).st_size
    for new_size in (4096, size + 4096, 0):
        with pytest.raises(OSError) as ei:
            os.ftruncate(fd, new_size)
        assert ei.value.errno == errno.EPERM
    with pytest.raises(OSError) as ei:
        os.pwrite(fd, b"x", size)  # growing by writing past the end
    assert ei.value.errno == errno.EPERM
    os.lseek(fd, size, os.SEEK_SET)
    with pytest.raises(OSError) as ei:
        os.write(fd, b"x")
    assert ei.value.errno == errno.EPERM
    with pytest.raises(OSError) as ei:  # F_SEAL_SEAL: nobody can freeze the others' writes
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
    assert ei.value.errno == errno.EPERM
    assert os.fstat(fd).st_size == size
    b = ring.Channel.attach_fd(fd)
    a.sendall(b"still whole")
    assert b.recv(20) == b"still whole"
    a.close()
    b.close()


def test_mapping_reopened_through_map_files_cannot_be_resized() -> None:
    """A process holding only a mapping (its descriptor closed) can reopen the file through
    /proc/self/map_files; the seals hold there too."""
    a = ring.Channel.create()
    inode = os.fstat(a.fileno()).st_ino
    size = os.fstat(a.fileno()).st_size
    a.close_fd()  # from here on this process holds only the mapping
    [address_range] = mappings_of(inode)
    try:
        fd = os.open(f"/proc/self/map_files/{address_range}", os.O_RDWR)
    except PermissionError:
        a.close()
        pytest.skip("opening /proc/self/map_files needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE")
    try:
        assert os.fstat(fd).st_ino == inode
        with pytest.raises(OSError) as ei:
            os.ftruncate(fd, 4096)
        assert ei.value.errno == errno.EPERM
        with pytest.raises(OSError) as ei:
            os.pwrite(fd, b"x", size)
        assert ei.value.errno == errno.EPERM
        assert os.fstat(fd).st_size == size
    finally:
        os.close(fd)
    a.sendall(b"ok")  # the mapping is intact
    assert a.tx.write_index > 0
    a.close()


def test_attach_fd_refuses_unsealed_or_foreign_files() -> None:
    a = ring.Channel.create()
    header = os.pread(a.fileno(), 4096, 0)
    size = os.fstat(a.fileno()).st_size
    a.close()
    # a memfd with a perfect header and size, but not sealed (or only partly sealed)
    for seals in (0, fcntl.F_SEAL_SHRINK, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW):
        fd = os.memfd_create("hvsock-channel", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            os.pwrite(fd, header, 0)
            if seals:
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            with pytest.raises(OSError) as ei:
                ring.Channel.attach_fd(fd)
            assert ei.value.errno == errno.EPERM, seals
        finally:
            os.close(fd)
    # a regular file with the same bytes
    with tempfile.TemporaryFile() as f:
        f.write(header)
        f.truncate(size)
        f.flush()
        with pytest.raises(OSError) as ei:
            ring.Channel.attach_fd(f.fileno())
        assert ei.value.errno == errno.EPERM
    # not a file at all
    r, w = os.pipe()
    try:
        with pytest.raises(OSError) as ei:
            ring.Channel.attach_fd(r)
        assert ei.value.errno == errno.EPERM
    finally:
        os.close(r)
        os.close(w)


def test_attach_fd_refuses_bad_headers() -> None:
    a = ring.Channel.create()
    header = os.pread(a.fileno(), 4096, 0)
    a.close()
    bad = [
        (4096 * 6, b"\0" * 64),  # no magic
        (4096 * 6, b"NOTACHAN" + header[8:]),
        (4096 * 6, header[:8] + (99).to_bytes(4, "little") + header[12:]),  # version
        (4096 * 3, header),  # the header's ring sizes do not add up to the file's size
        (4096 * 7, header),
        (2048, header[:2048]),  # smaller than the header page
        (4096 * (1 + 1 + 5), header[:12] + (1).to_bytes(4, "little") + (5).to_bytes(4, "little")),
    ]
    for size, content in bad:
        fd = shm.sealed_memfd("hvsock-channel", size, content)
        try:
            with pytest.raises(ring.RingCorruptError):
                ring.Channel.attach_fd(fd)
        finally:
            os.close(fd)


def test_create_and_attach_validate_arguments() -> None:
    with pytest.raises(ValueError):
        ring.Channel.create(1, 3)
    with pytest.raises(ValueError):
        ring.Channel.create(2, 65)
    with pytest.raises(ValueError):
        ring.Channel.create(end=2)
    with pytest.raises(TypeError):
        ring.Channel()
    a = ring.Channel.create()
    with pytest.raises(ValueError):
        ring.Channel.attach_fd(a.fileno(), end=2)
    assert a.mapped_mask == 0b01  # nothing taken by the refused calls
    a.close()


def test_taken_ends_are_refused_with_ebusy() -> None:
    a = ring.Channel.create(end=0)
    fd = a.fileno()
    with pytest.raises(OSError) as ei:
        ring.Channel.attach_fd(fd, end=0)
    assert ei.value.errno == errno.EBUSY
    b = ring.Channel.attach_fd(fd, end=1)
    for end in (0, 1, None):
        with pytest.raises(OSError) as ei:
            ring.Channel.attach_fd(fd, end=end)
        assert ei.value.errno == errno.EBUSY
    assert a.mapped_mask == b.mapped_mask == 0b11
    a.close()
    b.close()


def test_attach_fd_leaves_the_descriptor_to_its_caller() -> None:
    a = ring.Channel.create()
    fd = os.dup(a.fileno())
    a.close_fd()
    a.close_fd()  # idempotent
    with pytest.raises(OSError) as ei:
        a.fileno()
    assert ei.value.errno == errno.EBADF
    b = ring.Channel.attach_fd(fd)
    os.fstat(fd)  # still open: ours to close
    os.close(fd)
    a.sendall(b"after the descriptors are gone")
    assert b.recv(64) == b"after the descriptors are gone"
    a.close()
    b.close()


def test_creator_close_releases_descriptor_and_mapping() -> None:
    fds = open_fds()
    a = ring.Channel.create(6, 6)
    fd = a.fileno()
    inode = os.fstat(fd).st_ino
    assert mappings_of(inode)
    a.close()
    assert open_fds() == fds
    assert mappings_of(inode) == []
    with pytest.raises(OSError) as ei:
        a.fileno()
    assert ei.value.errno == errno.EBADF


def test_garbage_collected_creator_releases_its_descriptor() -> None:
    fds = open_fds()
    a = ring.Channel.create()
    inode = os.fstat(a.fileno()).st_ino
    del a
    gc.collect()
    assert mappings_of(inode) == []
    assert open_fds() == fds


def test_broker_creates_for_two_other_ends() -> None:
    host = ring.Channel.create(64, 64, end=None)
    with pytest.raises(ValueError):
        _ = host.tx
    assert host.mapped_mask == 0
    e0 = ring.Channel.attach_fd(host.fileno())
    e1 = ring.Channel.attach_fd(host.fileno())
    host.close_fd()  # both ends handed over
    assert (e0.end, e1.end) == (0, 1) and host.mapped_mask == 0b11
    assert host.wait_peer(timeout=1)
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


def test_mapped_mask_offset_is_in_header() -> None:
    a, b = ring.Channel.pair()
    assert OFF_MAPPED_MASK == 0x14 and a.mapped_mask == b.mapped_mask == 3
    with pytest.raises(OSError):
        a.fileno()  # pair() hands over and drops the creator's descriptor
    a.close()
    b.close()


@pytest.mark.parametrize("broker_first", [True, False])
def test_a_view_end_shares_the_brokers_mapping(broker_first: bool) -> None:
    host = ring.Channel.create(2, 3, end=None)
    fds = open_fds()
    view = host.view_end(0)
    assert open_fds() == fds  # no second descriptor, and one mapping of the segment
    assert len(mappings_of(os.fstat(host.fileno()).st_ino)) == 1
    assert view.end == 0 and host.mapped_mask == 0b01
    with pytest.raises(OSError) as ei:
        host.view_end(0)  # taken, as for attach_fd
    assert ei.value.errno == errno.EBUSY
    inode = os.fstat(host.fileno()).st_ino
    peer = ring.Channel.attach_fd(host.fileno())
    host.close_fd()
    view.sendall(b"ping")
    assert peer.recv(16) == b"ping"
    peer.sendall(b"pong")
    assert view.recv(16) == b"pong"
    first, second = (host, view) if broker_first else (view, host)
    first.close()
    assert first.closed and not second.closed
    assert len(mappings_of(inode)) == 2  # the peer's, and the one the other still uses
    if second is view:
        view.sendall(b"x")
        assert peer.recv(16) == b"x"
    else:
        assert host.mapped_mask == 0b11
    second.close()
    peer.close()
    assert mappings_of(inode) == []
