"""ListChannels reports the bytes moved on shared-memory channels, as on relayed ones.

An end on shared memory writes its ring itself: the host counts nothing on the way, so it
reports the ring's own bytes_written counter (ring/_layout.pxd) for that direction.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Iterator

import pytest

import guest_client as hv
from hvsock.v1 import hvsock_pb2

from .hostproc import HostProcess, run_host
from .test_multi_session import recv_exactly

pytestmark = pytest.mark.integration


@pytest.fixture
def host(tmp_path: pathlib.Path) -> Iterator[HostProcess]:
    with run_host(tmp_path) as process:
        yield process


def _channel(host: HostProcess, channel_id: int) -> hvsock_pb2.ChannelStatus:
    channel, admin = host.admin()
    with channel:
        answer = admin.ListChannels(
            hvsock_pb2.ListChannelsRequest(), metadata=host.metadata, timeout=10
        )
    (status,) = [c for c in answer.channels if c.channel_id == channel_id]
    return status


@pytest.mark.parametrize("data_path", ["shm", "relay"])
def test_list_channels_counts_bytes_both_ways(
    host: HostProcess, data_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HVSOCK_DATA_PATH", data_path)
    created = host.create_vm()
    vm = hv.attach(host.target, vm_id=created.partition.vm_id, token=created.token)
    root = hv.attach_host(host.target, token=host.token)
    service = "c0ffee00-0000-4000-8000-0000000c0c00"
    try:
        listener = root.socket()
        listener.bind((hv.HV_GUID_WILDCARD, service))
        listener.listen(1)
        out = vm.socket()
        out.connect((hv.HV_GUID_PARENT, service))
        inbound, _ = listener.accept()
        assert out.data_path == inbound.data_path == data_path
        out.sendall(b"a" * 3000)  # connector -> listener
        assert recv_exactly(inbound, 3000) == b"a" * 3000
        inbound.sendall(b"b" * 1234)  # listener -> connector
        assert recv_exactly(out, 1234) == b"b" * 1234

        status = _channel(host, out.channel_id)
        assert status.connector_data_path == status.listener_data_path
        assert (status.to_listener.bytes, status.to_connector.bytes) == (3000, 1234)
        # Written and not read yet: in the ring, and counted. A relayed sendall returns once
        # the bytes are on the client's stream; the host counts them as it writes the ring.
        out.sendall(b"c" * 500)
        deadline = time.monotonic() + 10
        while (status := _channel(host, out.channel_id)).to_listener.bytes < 3500:
            assert time.monotonic() < deadline, status
        assert status.to_listener.bytes == 3500
        if data_path == "shm":
            assert status.to_listener.ring_used > 500  # 500 bytes and the packet framing
        for sock in (out, inbound, listener):
            sock.close()
    finally:
        vm.close()
        root.close()
