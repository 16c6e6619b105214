"""``hvsock-host --max-sessions-per-partition N``: how many attach sessions (processes) one
partition may have at once, against a live host through guest_client.

One attach more than the limit fails with ENOBUFS (RESOURCE_EXHAUSTED on the wire) and leaves
the partition's live sessions alone; ending one of them lets a new attach in.  The limit is
per partition: a full host partition does not keep a VM from attaching.
"""

from __future__ import annotations

import errno
import pathlib
import uuid
from collections.abc import Iterator

import pytest

import guest_client as hv
from hvsock.v1 import hvsock_pb2

from .hostproc import HostProcess, run_host, usage_error
from .test_host_badinput import get_partition, wait_for_sessions
from .test_host_service_ops import host_info

pytestmark = pytest.mark.integration

PARENT = hv.HV_GUID_PARENT.lower()


def create_vm(host: HostProcess, name: str) -> hvsock_pb2.CreatePartitionResponse:
    return host.create_vm(name)


@pytest.fixture
def host(tmp_path: pathlib.Path) -> Iterator[HostProcess]:
    with run_host(tmp_path, "--max-sessions-per-partition", "2") as process:
        yield process


@pytest.fixture(autouse=True)
def relay_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attaching is all these tests do: no shared-memory probe needed."""
    monkeypatch.setenv("HVSOCK_DATA_PATH", "relay")


def test_the_limit_is_reported(host: HostProcess) -> None:
    assert host_info(host).limits.max_sessions_per_partition == 2
    root = hv.attach_host(host.target, token=host.token)
    try:
        assert root.limits.max_sessions_per_partition == 2  # in the welcome, too
    finally:
        root.close()


def test_one_attach_more_than_the_limit_fails_with_enobufs(host: HostProcess) -> None:
    program = hv.attach_host(host.target, token=host.token)
    bridge = hv.attach_host(host.target, token=host.token)
    attached = [program, bridge]
    try:
        assert get_partition(host, PARENT).session_count == 2
        with pytest.raises(OSError) as info:
            attached.append(hv.attach_host(host.target, token=host.token))
        assert info.value.errno == errno.ENOBUFS
        message = str(info.value)
        assert "max_sessions_per_partition" in message and "2 sessions" in message, message
        assert "end one before attaching again" in message, message

        # The refused attach took nothing from the two live sessions.
        assert get_partition(host, PARENT).session_count == 2
        listener = bridge.socket()
        listener.bind((hv.HV_GUID_WILDCARD, str(uuid.uuid4())))
        listener.listen()
        listener.close()

        # The limit is per partition: a VM still attaches while the host partition is full.
        vm = create_vm(host, "vm")
        guest = hv.attach(host.target, vm_id=vm.partition.vm_id, token=vm.token)
        attached.append(guest)
        assert get_partition(host, vm.partition.vm_id).session_count == 1

        # Ending one host session makes room for a new one, and only one.
        bridge.close()
        wait_for_sessions(host, PARENT, 1)
        again = hv.attach_host(host.target, token=host.token)
        attached.append(again)
        assert again.session not in (program.session, bridge.session)
        assert get_partition(host, PARENT).session_count == 2
        with pytest.raises(OSError) as info:
            attached.append(hv.attach_host(host.target, token=host.token))
        assert info.value.errno == errno.ENOBUFS
    finally:
        for partition in attached:
            partition.close()
    wait_for_sessions(host, PARENT, 0)


def test_a_vm_has_the_same_limit(host: HostProcess) -> None:
    vm = create_vm(host, "busy")
    vm_id = vm.partition.vm_id
    first = hv.attach(host.target, vm_id=vm_id, token=vm.token)
    second = hv.attach(host.target, vm_id=vm_id, token=vm.token)
    try:
        with pytest.raises(OSError) as info:
            hv.attach(host.target, vm_id=vm_id, token=vm.token).close()
        assert info.value.errno == errno.ENOBUFS
        assert vm_id in str(info.value)
    finally:
        second.close()
        first.close()
    wait_for_sessions(host, vm_id, 0)


def test_the_limit_from_the_environment(tmp_path: pathlib.Path) -> None:
    with run_host(tmp_path, env={"HVSOCK_MAX_SESSIONS_PER_PARTITION": "1"}) as host:
        assert host_info(host).limits.max_sessions_per_partition == 1
        only = hv.attach_host(host.target, token=host.token)
        try:
            with pytest.raises(OSError) as info:
                hv.attach_host(host.target, token=host.token).close()
            assert info.value.errno == errno.ENOBUFS
        finally:
            only.close()


def test_the_default_limit(tmp_path: pathlib.Path) -> None:
    with run_host(tmp_path) as host:
        assert host_info(host).limits.max_sessions_per_partition == 64


@pytest.mark.parametrize(
    ("args", "env", "error"),
    [
        (["--max-sessions-per-partition", "0"], {}, "must be at least 1, not 0"),
        (["--max-sessions-per-partition", "many"], {}, "argument --max-sessions-per-partition"),
        ([], {"HVSOCK_MAX_SESSIONS_PER_PARTITION": "0"}, "HVSOCK_MAX_SESSIONS_PER_PARTITION"),
    ],
)
def test_a_bad_limit_is_a_usage_error(
    tmp_path: pathlib.Path, args: list[str], env: dict[str, str], error: str
) -> None:
    assert error in usage_error(tmp_path, args, env)
