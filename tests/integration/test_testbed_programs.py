"""The testbed programs (``python -m hvsock_tools.testbed``) against a real host process.

Who a VM is (replica slots, identity files, a name taken over or refused) and what a person
reads (one summary table, JSON lines on request, truncated echoes, VMs without an echo service).
"""

from __future__ import annotations

import json
import os
import pathlib
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import guest_client as hv
from hvsock.v1 import hvsock_pb2
from hvsock_tools.demo import HOST_ECHO_PORT, echo_client, serve_echo
from hvsock_tools.testbed import summary_rows, summary_table

from .hostproc import HostProcess, run_host

pytestmark = pytest.mark.integration


@pytest.fixture
def host(tmp_path: pathlib.Path) -> Iterator[HostProcess]:
    with run_host(tmp_path, "--auto-create-vms") as process:
        yield process


@pytest.fixture
def host_echo(host: HostProcess) -> Iterator[hv.Partition]:
    """The host partition with an echo service on the host echo port (the VM program's peer)."""
    root = hv.attach_host(host.target, token=host.token)
    listener = root.socket()
    listener.bind((hv.HV_GUID_WILDCARD, hv.service_id_for_port(HOST_ECHO_PORT)))
    listener.listen(16)
    serve_echo(listener)
    yield root
    listener.close()
    root.close()


class Program:
    """``python -m hvsock_tools.testbed ARGS`` as a child process, its output read as it comes."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: pathlib.Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hvsock_tools.testbed", *args],
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=cwd,
        )
        self.lines: list[str] = []
        self._new: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._new.put(line.rstrip("\n"))
        self._new.put(None)

    def wait_for(self, what: str, match: Callable[[str], bool], timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self._new.get(timeout=max(left, 0.01))
            except queue.Empty:
                line = ""
            if line is None:
                raise AssertionError(f"exited before {what}:\n" + "\n".join(self.lines))
            if line:
                self.lines.append(line)
                if match(line):
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n" + "\n".join(self.lines))

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]

    def finish(self, timeout: float = 30) -> int:
        code = self.proc.wait(timeout=timeout)
        while (line := self._new.get(timeout=10)) is not None:
            self.lines.append(line)
        return code

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.finish()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def programs() -> Iterator[list[Program]]:
    started: list[Program] = []
    yield started
    for program in started:
        program.kill()


def _env(host: HostProcess, **more: str) -> dict[str, str]:
    env = {"HVSOCK_HOST": host.target, "HVSOCK_PERSONALITY": "linux", **more}
    for name in ("HVSOCK_VM_ID", "HVSOCK_TOKEN", "HVSOCK_VM_NAME", "HVSOCK_VM_SLOT"):
        env.setdefault(name, "")
    return env


def _start_vm(
    programs: list[Program],
    host: HostProcess,
    cwd: pathlib.Path,
    *args: str,
    nbytes: int = 65536,
    **env: str,
) -> tuple[Program, dict[str, Any]]:
    """A VM program (JSON output); its "attached" record once it has attached."""
    program = Program(["--json", f"--bytes={nbytes}", "vm", *args], _env(host, **env), cwd)
    programs.append(program)
    line = program.wait_for("the VM to attach", lambda line: '"attached": true' in line)
    return program, json.loads(line)


def _partitions(host: HostProcess) -> dict[str, hvsock_pb2.Partition]:
    channel, admin = host.admin()
    with channel:
        answer = admin.ListPartitions(
            hvsock_pb2.ListPartitionsRequest(), metadata=host.metadata, timeout=10
        )
    return {p.name: p for p in answer.partitions}


def _detached(host: HostProcess, name: str) -> bool:
    deadline = time.monotonic() + 10
    while _partitions(host)[name].attached:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_replicas_take_one_slot_each_and_come_back_as_the_same_vm(
    host: HostProcess, host_echo: hv.Partition, tmp_path: pathlib.Path, programs: list[Program]
) -> None:
    identities = tmp_path / "identities"
    env = {"HVSOCK_VM_IDENTITY_DIR": str(identities)}
    first, a = _start_vm(programs, host, tmp_path, "--name-prefix=rep", **env)
    second, b = _start_vm(programs, host, tmp_path, "--name-prefix=rep", **env)
    assert {a["vm_name"], b["vm_name"]} == {"rep-1", "rep-2"}
    assert a["vm_id"] != b["vm_id"]
    for program in (first, second):  # each echoed with the host, checked
        program.wait_for("the VM's echo", lambda line: '"kind": "echo"' in line)
        echo = [r for r in program.records() if r["kind"] == "echo"][-1]
        assert echo["ok"] and echo["bytes"] == 65536, echo

    # Stopped and started again ("recreated"): the free slot, the same VM (identity file).
    assert first.stop() == 0
    assert _detached(host, a["vm_name"])
    third, c = _start_vm(programs, host, tmp_path, "--name-prefix=rep", **env)
    assert (c["vm_name"], c["vm_id"]) == (a["vm_name"], a["vm_id"])

    # The identity file lost (a new volume, another Swarm node): the same VM by its name,
    # which the host lets an attach take over while no one is attached as it.
    assert third.stop() == 0
    assert _detached(host, a["vm_name"])
    (identities / f"{a['vm_name']}.json").unlink()
    fourth, d = _start_vm(programs, host, tmp_path, "--name-prefix=rep", **env)
    assert (d["vm_name"], d["vm_id"]) == (a["vm_name"], a["vm_id"])

    # A stale identity file (the token it holds was replaced by that take-over): set aside,
    # and the VM is attached by name again.
    assert fourth.stop() == 0
    assert _detached(host, a["vm_name"])
    saved = identities / f"{a['vm_name']}.json"
    saved.write_text(json.dumps({"vm_id": a["vm_id"], "token": "not-the-token"}))
    _, e = _start_vm(programs, host, tmp_path, "--name-prefix=rep", **env)
    assert (e["vm_name"], e["vm_id"]) == (a["vm_name"], a["vm_id"])
    assert (identities / f"{a['vm_name']}.json.stale").exists()
    assert json.loads(saved.read_text())["token"] != "not-the-token"

    # Swarm's task slot, when given, is the slot.
    _, f = _start_vm(programs, host, tmp_path, "--name-prefix=rep", HVSOCK_VM_SLOT="7", **env)
    assert f["vm_name"] == "rep-7"


def test_a_name_an_attached_vm_has_is_a_clear_error(
    host: HostProcess, host_echo: hv.Partition, tmp_path: pathlib.Path, programs: list[Program]
) -> None:
    _, vm = _start_vm(
        programs, host, tmp_path, "--name=web", HVSOCK_VM_IDENTITY_DIR=str(tmp_path / "a")
    )
    start = time.monotonic()
    clash = Program(
        ["vm", "--name=WEB"],  # names are unique ignoring case
        _env(host, HVSOCK_VM_IDENTITY_DIR=str(tmp_path / "b")),
        tmp_path,
    )
    programs.append(clash)
    assert clash.finish() == 2
    assert time.monotonic() - start < 10
    text = "\n".join(clash.lines)
    assert "Traceback" not in text, text
    (line,) = clash.lines
    assert line.startswith("testbed vm: cannot attach as VM WEB:"), line
    assert f"VM 'web' ({vm['vm_id']}) exists and is attached" in line, line
    # The VM that has the name was not disturbed.
    web = _partitions(host)["web"]
    assert web.vm_id == vm["vm_id"] and web.attached and web.session_count == 1


def test_the_host_program_prints_one_complete_summary_table(
    host: HostProcess, tmp_path: pathlib.Path, programs: list[Program]
) -> None:
    hostprog = Program(
        ["--bytes=1048576", "host"],
        {"HVSOCK_HOST": host.target, "HVSOCK_HOST_TOKEN": host.token},
        tmp_path,
    )
    programs.append(hostprog)
    hostprog.wait_for("the host program to listen", lambda line: "listening" in line)
    for name, more in (
        ("tb-shm", {}),
        ("tb-relay", {"HVSOCK_DATA_PATH": "relay", "HVSOCK_PERSONALITY": "windows"}),
    ):
        _start_vm(programs, host, tmp_path, f"--name={name}", nbytes=2**20, **more)
    hostprog.wait_for("the summary", lambda line: line.startswith("testbed summary"))
    rows_seen: set[str] = set()

    def both_rows(line: str) -> bool:
        rows_seen.update(name for name in ("tb-shm", "tb-relay") if line.startswith(name))
        return len(rows_seen) == 2

    hostprog.wait_for("the rows of both VMs", both_rows, timeout=5)
    assert hostprog.stop() == 0
    text = "\n".join(hostprog.lines)
    assert text.count("testbed summary") == 1, text
    rows = {line.split()[0]: line for line in hostprog.lines if line.startswith("tb-")}
    assert "shared memory  shared memory  1.0 MiB" in rows["tb-shm"], text
    assert "gRPC relay     shared memory  1.0 MiB" in rows["tb-relay"], text
    assert " - " not in text and "FAILED" not in text, text
    # For people only: no JSON, and every line is one of the program's sentences.
    assert not [line for line in hostprog.lines if line.startswith(("{", "RESULT"))], text
    # The VMs were asked for JSON: every line of theirs is one object.
    for vm in programs[1:]:
        assert vm.stop() == 0
        assert {r["kind"] for r in vm.records()} <= {"note", "echo"}, vm.lines


def test_echo_to_every_vm_skips_the_ones_without_an_echo_service(
    host: HostProcess, host_echo: hv.Partition, tmp_path: pathlib.Path, programs: list[Program]
) -> None:
    _, echoing = _start_vm(programs, host, tmp_path, "--name=has-echo")
    # A VM listening on another service only (vm-web in the testbed).
    other = host.create_vm("no-echo", personality="windows")
    vm = hv.attach(host.target, vm_id=other.partition.vm_id, token=other.token)
    try:
        listener = vm.socket()
        listener.bind((hv.HV_GUID_WILDCARD, hv.service_id_for_port(80)))
        listener.listen(1)
        done = subprocess.run(
            [sys.executable, "-m", "hvsock_tools.testbed", "--bytes=65536", "echo", "--to=vms"],
            env={**os.environ, "HVSOCK_HOST": host.target, "HVSOCK_HOST_TOKEN": host.token},
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Traceback" not in done.stderr
        lines = done.stdout.splitlines()
        assert any("-> has-echo: sha256 ok, 0.1 MiB" in line for line in lines), lines
        assert any("-> no-echo: skipped: no echo service" in line for line in lines), lines
        assert lines[-1] == "echo with every VM: 1 ok, 1 skipped, 0 failed", lines
        listener.close()
    finally:
        vm.close()
    assert echoing["vm_name"] == "has-echo"


def _echo_with(
    host: HostProcess, port: int, serve: Callable[[Any], None], nbytes: int
) -> dict[str, Any]:
    """``echo_client``'s result against a VM whose one connection ``serve(conn)`` answers."""
    created = host.create_vm()
    vm = hv.attach(host.target, vm_id=created.partition.vm_id, token=created.token)
    root = hv.attach_host(host.target, token=host.token)
    service = hv.service_id_for_port(port)
    try:
        listener = vm.socket()
        listener.bind((hv.HV_GUID_WILDCARD, service))
        listener.listen(1)

        def accept_and_serve() -> None:
            conn, _ = listener.accept()
            with conn:
                serve(conn)

        server = threading.Thread(target=accept_and_serve, daemon=True)
        server.start()
        result = echo_client(root, (vm.vm_id, service), nbytes)
        server.join(10)
        listener.close()
        return result
    finally:
        vm.close()
        root.close()


def test_a_truncated_echo_says_so_with_the_byte_count(host: HostProcess) -> None:
    def echo_part_then_close(conn: Any) -> None:
        got = 0
        while got < 100_000:
            data = conn.recv(100_000 - got)
            conn.sendall(data)
            got += len(data)

    result = _echo_with(host, 7100, echo_part_then_close, 1_000_000)
    assert result["connected"] and not result["ok"], result
    assert result["truncated"] and result["bytes"] == 100_000, result
    assert result["error"] == "truncated: 100000 of 1000000 bytes came back", result


def test_the_echo_client_keeps_sending_while_nothing_comes_back(host: HostProcess) -> None:
    """Full duplex: a server that echoes only once it has read everything (a store and
    forward) still gets all of it, as it would from any program that streams; a client that
    stopped sending once some bytes were in flight would wait on it forever."""

    def store_then_echo(conn: Any) -> None:
        stored = bytearray()
        while data := conn.recv(65536):
            stored += data
        conn.sendall(stored)

    result = _echo_with(host, 7101, store_then_echo, 2_000_000)
    assert result["ok"] and result["bytes"] == 2_000_000, result


def test_summary_rows_and_table_for_a_failed_echo() -> None:
    failed = {
        "ok": False,
        "bytes": 5,
        "mb_per_s": 0.0,
        "error": "truncated: 5 of 9 bytes came back",
    }
    rows = summary_rows(
        [
            (
                "0123456789",
                {
                    "name": "vm-a",
                    "personality": "linux",
                    "host->vm": {"data_path": "shm", "host_data_path": "shm", **failed},
                },
            )
        ]
    )
    table = summary_table(rows)
    assert "FAILED (truncated)" in table
    assert "vm-a host->vm: truncated: 5 of 9 bytes came back" in table
    assert "(-: no echo that way yet)" in table
