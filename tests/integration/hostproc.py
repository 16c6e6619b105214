"""Run a real ``hvsock-host`` process for tests: loopback/Unix socket only, private shm dir."""

from __future__ import annotations

import contextlib
import itertools
import os
import pathlib
import secrets
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from guest_client._partition import PERSONALITIES
from hvsock.v1 import hvsock_pb2, hvsock_pb2_grpc

BIN = pathlib.Path(sys.executable).parent
#: Partition names are unique on a host: tests that do not care get vm-1, vm-2, ...
_VM_NUMBERS = itertools.count(1)


@dataclass
class HostProcess:
    proc: subprocess.Popen[str]
    target: str
    token: str
    shm_dir: pathlib.Path
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
        return sorted(p.name for p in self.shm_dir.iterdir())

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


@contextlib.contextmanager
def run_host(
    tmp_path: pathlib.Path,
    *extra: str,
    env: dict[str, str] | None = None,
    like: HostProcess | None = None,
) -> Iterator[HostProcess]:
    """Start a host; ``like`` reuses another (stopped) host's socket, token and shm dir, so
    clients can find it again as after a restart."""
    if like is not None:
        shm_dir, token, state = like.shm_dir, like.token, like.state
        sock = pathlib.Path(like.target.removeprefix("unix:"))
        sock.unlink(missing_ok=True)
    else:
        shm_dir = pathlib.Path("/dev/shm") / f"hvsock-test-{secrets.token_hex(6)}"
        shm_dir.mkdir(mode=0o700)
        sock = tmp_path / f"host-{secrets.token_hex(4)}.sock"
        token = secrets.token_urlsafe(16)
        state = tmp_path / "state.sqlite"
    full_env = {**os.environ, "HVSOCK_SHM_DIR": str(shm_dir), **(env or {})}
    drain: threading.Thread | None = None
    proc = subprocess.Popen(
        [
            str(BIN / "hvsock-host"),
            "--listen",
            "127.0.0.1:0",
            "--unix",
            str(sock),
            f"--host-token={token}",  # the = form: a token may start with "-"
            "--shm-dir",
            str(shm_dir),
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
        yield HostProcess(proc, f"unix:{sock}", token, shm_dir, state, log)
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
        if like is None:
            shutil.rmtree(shm_dir, ignore_errors=True)
