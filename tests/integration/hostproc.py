"""Run a real ``hvsock-host`` process for tests: loopback/Unix sockets only, in a temp dir."""

from __future__ import annotations

import contextlib
import itertools
import os
import pathlib
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from guest_client._partition import PERSONALITIES
from hvsock.v1 import hvsock_pb2, hvsock_pb2_grpc
from hvsock_common.conventions import new_token

BIN = pathlib.Path(sys.executable).parent
#: Partition names are unique on a host: tests that do not care get vm-1, vm-2, ...
_VM_NUMBERS = itertools.count(1)


@dataclass
class HostProcess:
    proc: subprocess.Popen[str]
    target: str
    token: str
    #: The host's descriptor socket (ring memory is handed over on it).
    shm_socket: pathlib.Path
    state: pathlib.Path
    log: list[str]

    def admin(self) -> tuple[grpc.Channel, hvsock_pb2_grpc.AdminServiceStub]:
        channel = grpc.insecure_channel(self.target)
        return channel, hvsock_pb2_grpc.AdminServiceStub(channel)

    @property
    def metadata(self) -> tuple[tuple[str, str]]:
        return (("x-hvsock-token", self.token),)

    def create_vm(
        self, name: str | None = None, personality: str = "linux"
    ) -> hvsock_pb2.CreatePartitionResponse:
        """Create a VM with the admin API; its id and its token are in the answer.  Without a
        name, a fresh one (names are unique on a host)."""
        if name is None:
            name = f"vm-{next(_VM_NUMBERS)}"
        channel, admin = self.admin()
        with channel:
            created: hvsock_pb2.CreatePartitionResponse = admin.CreatePartition(
                hvsock_pb2.CreatePartitionRequest(
                    name=name,
                    personality=PERSONALITIES[personality],
                ),
                metadata=self.metadata,
                timeout=10,
            )
        return created

    def segments(self) -> list[str]:
        """The ring segments the host has mapped (memfd inodes in its /proc maps)."""
        return mapped_segments(self.proc.pid)

    def no_segments_within(self, timeout: float = 10.0) -> list[str]:
        """Poll until the host maps no ring segment (channels are reclaimed after they end, off
        the event loop), for at most ``timeout`` seconds; returns what is still mapped."""
        deadline = time.monotonic() + timeout
        while (left := self.segments()) and time.monotonic() < deadline:
            time.sleep(0.02)
        return left

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


def mapped_segments(pid: int) -> list[str]:
    """Distinct ring segments (memfd inodes) mapped by process ``pid`` (none once it exited:
    anonymous memory goes with its last holder)."""
    inodes = set()
    try:
        with open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and fields[5].startswith("/memfd:hvsock-channel"):
                    inodes.add(fields[4])
    except FileNotFoundError:
        pass
    return sorted(inodes)


@contextlib.contextmanager
def run_host(
    tmp_path: pathlib.Path,
    *extra: str,
    env: dict[str, str] | None = None,
    like: HostProcess | None = None,
) -> Iterator[HostProcess]:
    """Start a host; ``like`` reuses another (stopped) host's sockets and token, so clients can
    find it again as after a restart."""
    if like is not None:
        shm_socket, token, state = like.shm_socket, like.token, like.state
        sock = pathlib.Path(like.target.removeprefix("unix:"))
        sock.unlink(missing_ok=True)
    else:
        name = secrets.token_hex(4)
        sock = tmp_path / f"host-{name}.sock"
        shm_socket = tmp_path / f"shm-{name}.sock"
        token = new_token(16)
        state = tmp_path / "state.sqlite"
    full_env = {**os.environ, **(env or {})}
    drain: threading.Thread | None = None
    proc = subprocess.Popen(
        [
            str(BIN / "hvsock-host"),
            "--listen",
            "127.0.0.1:0",
            "--unix",
            str(sock),
            f"--host-token={token}",  # the = form: a token may start with "-"
            f"--shm-socket={shm_socket}",
            "--log-level",
            "DEBUG",
            *extra,
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
    )
    assert proc.stderr is not None
    try:
        log: list[str] = []
        for line in proc.stderr:
            log.append(line)
            if "serving on" in line:
                break
        else:
            raise RuntimeError(f"hvsock-host exited with {proc.wait()}: {''.join(log)}")
        # Keep draining stderr so the server never blocks on a full pipe.
        drain = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
        drain.start()
        yield HostProcess(proc, f"unix:{sock}", token, shm_socket, state, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if drain is not None:
            drain.join()
        proc.stderr.close()


def usage_error(tmp_path: pathlib.Path, args: list[str], env: dict[str, str]) -> str:
    """Start ``hvsock-host`` with ``args`` and ``env`` expecting a usage error (exit 2); its
    message."""
    result = subprocess.run(
        [str(BIN / "hvsock-host"), "--listen", "127.0.0.1:0", *args],
        env={"PATH": "/usr/bin:/bin", "XDG_CONFIG_HOME": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    return result.stderr
