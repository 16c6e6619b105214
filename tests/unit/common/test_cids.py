"""vsock CIDs for VMs (``hvsock run --host-partition``): deterministic, never a reserved CID,
and resolved back only when exactly one VM has the CID."""

from __future__ import annotations

import uuid

import pytest

from hvsock_common import addresses
from hvsock_common.errors import NetworkUnreachable

pytestmark = pytest.mark.unit


def test_cid_is_deterministic_and_case_insensitive() -> None:
    vm_id = "1ef705d6-0000-4000-8000-000000000001"
    cid = addresses.cid_for_vm_id(vm_id)
    assert cid == addresses.cid_for_vm_id("{" + vm_id.upper() + "}")
    assert 3 <= cid < 0x7FFFFFFF


def test_cids_avoid_reserved_values_and_spread() -> None:
    cids = {addresses.cid_for_vm_id(str(uuid.UUID(int=i))) for i in range(5000)}
    assert len(cids) == 5000  # no collision among 5,000 sequential ids
    assert not cids & {0, 1, 2, 0xFFFFFFFF}
    assert all(cid < 0x7FFFFFFF for cid in cids)


def test_host_cid_resolution() -> None:
    vms = [str(uuid.uuid4()) for _ in range(3)]
    for vm_id in vms:
        assert addresses.vm_id_for_host_cid(addresses.cid_for_vm_id(vm_id), vms) == vm_id
    assert addresses.vm_id_for_host_cid(2, vms) == addresses.LOOPBACK
    assert addresses.vm_id_for_host_cid(1, vms) == addresses.LOOPBACK
    with pytest.raises(NetworkUnreachable, match="no VM has it"):
        addresses.vm_id_for_host_cid(12345, vms)


def test_guest_cids_stay_as_hv_sock_allows() -> None:
    assert addresses.vm_id_for_cid(2) == addresses.PARENT
    with pytest.raises(NetworkUnreachable):
        addresses.vm_id_for_cid(3)
