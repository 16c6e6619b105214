"""Bounded creation against a live host (issue 16): ``--max-partitions``, partition names
(length, characters, uniqueness) for AdminService.CreatePartition and for VMs created on
attach, and an anonymous attach taking over an idle auto-created VM of its name.

The finding this guards: with ``--auto-create-vms``, 500 anonymous Hellos with 200-character
names created 500 VMs, all kept in the state file.  Now bad names create nothing, and the
count stops at the limit with ENOBUFS (RESOURCE_EXHAUSTED on the wire).
"""

from __future__ import annotations

import errno
import json
import pathlib
from collections.abc import Iterator

import grpc
import pytest

import guest_client as hv
from guest_client import errors
from hvsock.v1 import hvsock_pb2

from .hostproc import HostProcess, run_host, usage_error
from .test_host_badinput import admin_call, attach_error, wait_for_sessions
from .test_host_service_ops import host_info

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def relay_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attaching is all these tests do: no shared-memory probe needed."""
    monkeypatch.setenv("HVSOCK_DATA_PATH", "relay")
    for name in ("HVSOCK_VM_ID", "HVSOCK_TOKEN", "HVSOCK_VM_IDENTITY", "HVSOCK_VM_NAME"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def host(tmp_path: pathlib.Path) -> Iterator[HostProcess]:
    with run_host(
        tmp_path, "--auto-create-vms", "--max-partitions", "3", "--state", str(tmp_path / "s.db")
    ) as process:
        yield process


def vm_names(host: HostProcess) -> list[str]:
    listed = admin_call(host, "ListPartitions", hvsock_pb2.ListPartitionsRequest())
    return [p.name for p in listed.partitions if not p.host]


def create_error(host: HostProcess, name: str) -> OSError:
    with pytest.raises(grpc.RpcError) as info:
        admin_call(host, "CreatePartition", hvsock_pb2.CreatePartitionRequest(name=name))
    return errors.from_rpc_error(info.value)


def test_the_limit_is_reported(host: HostProcess) -> None:
    assert host_info(host).limits.max_partitions == 3
    vm = hv.attach(host.target, name="reported")
    try:
        assert vm.limits.max_partitions == 3  # in the welcome, too
    finally:
        vm.close()


def test_create_partition_stops_at_the_limit(host: HostProcess) -> None:
    for name in ("one", "two", "three"):
        host.create_vm(name)
    error = create_error(host, "four")
    assert error.errno == errno.ENOBUFS
    assert "3 VMs, the max_partitions limit" in str(error), error
    # Creating on attach stops at the same limit, with the same answer.
    with pytest.raises(OSError) as info:
        hv.attach(host.target, name="anonymous").close()
    assert info.value.errno == errno.ENOBUFS and "max_partitions" in str(info.value)
    with pytest.raises(OSError) as info:
        hv.attach(host.target).close()  # no name either
    assert info.value.errno == errno.ENOBUFS
    assert vm_names(host) == ["one", "two", "three"]
    # Deleting one makes room for one.
    first = admin_call(host, "ListPartitions", hvsock_pb2.ListPartitionsRequest()).partitions[1]
    admin_call(host, "DeletePartition", hvsock_pb2.DeletePartitionRequest(vm_id=first.vm_id))
    vm = hv.attach(host.target, name="anonymous")
    vm.close()
    assert vm_names(host) == ["two", "three", "anonymous"]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("n" * 200, "at most 64 characters, got 200"),
        ("has space", "bad partition name"),
        ("-dash-first", "bad partition name"),
        ("hv:vm:80", "bad partition name"),
    ],
)
def test_a_bad_name_is_invalid_argument(host: HostProcess, name: str, message: str) -> None:
    error = create_error(host, name)
    assert error.errno == errno.EINVAL and message in str(error), error
    with pytest.raises(OSError) as info:
        hv.attach(host.target, name=name).close()
    assert info.value.errno == errno.EINVAL and message in str(info.value), info.value
    assert vm_names(host) == []


def test_a_flood_of_anonymous_hellos_is_bounded(host: HostProcess) -> None:
    """The finding: anonymous Hellos with 200-character names.  None creates anything; nameless
    ones create VMs up to the limit and no further."""
    for _ in range(50):
        hello = hvsock_pb2.Hello(name="x" * 200)
        error = attach_error(host, hvsock_pb2.AttachRequest(hello=hello))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert errors.from_rpc_error(error).errno == errno.EINVAL
    assert vm_names(host) == []
    attached: list[hv.Partition] = []
    try:
        refused = 0
        for _ in range(10):
            try:
                attached.append(hv.attach(host.target))
            except OSError as exc:
                assert exc.errno == errno.ENOBUFS, exc
                refused += 1
        assert len(attached) == 3 and refused == 7
    finally:
        for vm in attached:
            vm.close()
    assert len(vm_names(host)) == 3


def test_names_are_unique(host: HostProcess) -> None:
    made = host.create_vm("db")
    for clash in ("db", "DB", "host"):
        error = create_error(host, clash)
        assert error.errno == errno.EEXIST and "already exists" in str(error), error
    # An operator's VM is never taken over by an anonymous attach.
    with pytest.raises(FileExistsError, match="not created on attach"):
        hv.attach(host.target, name="db").close()
    owner = hv.attach(host.target, vm_id=made.partition.vm_id, token=made.token)
    owner.close()
    # A VM created on attach holds its name while attached.
    first = hv.attach(host.target, name="busy")
    try:
        with pytest.raises(FileExistsError, match="is attached"):
            hv.attach(host.target, name="busy").close()
        error = create_error(host, "busy")
        assert error.errno == errno.EEXIST
    finally:
        first.close()
    assert sorted(vm_names(host)) == ["busy", "db"]


def test_a_recreated_vm_takes_its_name_over(tmp_path: pathlib.Path) -> None:
    """The testbed's VM containers: the identity file keeps a VM across host restarts; a
    container recreated without it attaches by name and is the same VM again (new token), and
    that survives a host restart too.  The VM that lost its identity cannot use the old token."""
    state = tmp_path / "state.db"
    identity = tmp_path / "vm-identity.json"
    args = ("--auto-create-vms", "--state", str(state))
    with run_host(tmp_path, *args) as first:
        vm = hv.attach(first.target, name="vm-web", identity=identity)
        vm_id, old_token = vm.vm_id, vm.token
        vm.close()
        wait_for_sessions(first, vm_id, 0)
        assert json.loads(identity.read_text()) == {"vm_id": vm_id, "token": old_token}
        first.stop()
        with run_host(tmp_path, *args, like=first) as second:
            # Re-attach with the identity after a host restart: the same VM.
            again = hv.attach(second.target, name="vm-web", identity=identity)
            assert again.vm_id == vm_id
            again.close()
            wait_for_sessions(second, vm_id, 0)
            # The container recreated: no identity file, the same name.
            identity.unlink()
            taken = hv.attach(
                second.target, name="vm-web", identity=identity, personality="windows"
            )
            try:
                assert taken.vm_id == vm_id and taken.token != old_token
                assert taken.personality == "windows"
                assert json.loads(identity.read_text())["token"] == taken.token
            finally:
                taken.close()
            wait_for_sessions(second, vm_id, 0)
            with pytest.raises(PermissionError):
                hv.attach(second.target, vm_id=vm_id, token=old_token).close()
            assert vm_names(second) == ["vm-web"]
            assert any("took over idle VM" in line for line in second.log), second.log
            second.stop()
        with run_host(tmp_path, *args, like=first) as third:
            # The new token and the auto-created mark were persisted.
            kept = hv.attach(third.target, identity=identity)
            assert kept.vm_id == vm_id and kept.personality == "windows"
            kept.close()
            wait_for_sessions(third, vm_id, 0)
            identity.unlink()
            hv.attach(third.target, name="vm-web", identity=identity).close()
            assert json.loads(identity.read_text())["vm_id"] == vm_id


def test_the_limit_from_the_environment(tmp_path: pathlib.Path) -> None:
    with run_host(tmp_path, env={"HVSOCK_MAX_PARTITIONS": "1"}) as host:
        assert host_info(host).limits.max_partitions == 1
        host.create_vm("only")
        assert create_error(host, "another").errno == errno.ENOBUFS


def test_the_default_limit(tmp_path: pathlib.Path) -> None:
    with run_host(tmp_path) as host:
        assert host_info(host).limits.max_partitions == 1024


@pytest.mark.parametrize(
    ("args", "env", "error"),
    [
        (["--max-partitions", "0"], {}, "must be at least 1, not 0"),
        (["--max-partitions", "lots"], {}, "argument --max-partitions"),
        ([], {"HVSOCK_MAX_PARTITIONS": "-3"}, "HVSOCK_MAX_PARTITIONS"),
    ],
)
def test_a_bad_limit_is_a_usage_error(
    tmp_path: pathlib.Path, args: list[str], env: dict[str, str], error: str
) -> None:
    assert error in usage_error(tmp_path, args, env)
