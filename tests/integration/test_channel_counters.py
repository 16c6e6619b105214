"""ListChannels reports the bytes moved on shared-memory channels, as on relayed ones.

An end on shared memory writes its ring itself: the host counts nothing on the way, so it
reports the ring's own bytes_written counter (ring/_layout.pxd) for that direction.
"""

from __future__ import annotations

import contextlib
import pathlib
import re
import time
import urllib.request
from collections.abc import Iterator

import pytest

import guest_client as hv
from host_service.core.relay import DEFAULT_RELAY_WINDOW
from hvsock.v1 import hvsock_pb2

from .hostproc import HostProcess, run_host
from .test_host_badinput import wait_for_no_channels
from .test_multi_session import recv_exactly

pytestmark = pytest.mark.integration


@pytest.fixture
def host(tmp_path: pathlib.Path) -> Iterator[HostProcess]:
    with run_host(tmp_path) as process:
        yield process


@contextlib.contextmanager
def _connected(
    host: HostProcess, service: str
) -> Iterator[tuple[str, hv.HvSocket, hv.HvSocket, hv.HvSocket]]:
    """A new VM connected to a host-partition listener on ``service`` (data paths as
    HVSOCK_DATA_PATH says): (VM id, listener, the VM's socket, the accepted one); both
    partitions are closed afterwards."""
    created = host.create_vm()
    vm = hv.attach(host.target, vm_id=created.partition.vm_id, token=created.token)
    root = hv.attach_host(host.target, token=host.token)
    try:
        listener = root.socket()
        listener.bind((hv.HV_GUID_WILDCARD, service))
        listener.listen(1)
        out = vm.socket()
        out.connect((hv.HV_GUID_PARENT, service))
        inbound, _ = listener.accept()
        yield created.partition.vm_id, listener, out, inbound
    finally:
        vm.close()
        root.close()


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
    with _connected(host, "c0ffee00-0000-4000-8000-0000000c0c00") as (_, listener, out, inbound):
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


def _metrics(host: HostProcess) -> dict[str, float]:
    """The host's Prometheus samples: ``name{labels}`` -> value."""
    serving = next(line for line in host.log if "serving on" in line)
    port = int(re.search(r"metrics on [^:]+:(\d+)", serving).group(1))  # type: ignore[union-attr]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        text = page.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


@pytest.mark.parametrize("data_path", ["shm", "relay"])
def test_prometheus_counts_shared_memory_bytes_and_ring_fill(
    tmp_path: pathlib.Path, data_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A known transfer: the shared-memory byte counter and the ring fill gauges follow it as
    the relay's byte counter follows a relayed one."""
    monkeypatch.setenv("HVSOCK_DATA_PATH", data_path)
    with run_host(tmp_path, "--metrics-port", "0") as host:
        service = "c0ffee00-0000-4000-8000-0000000c0c01"
        with _connected(host, service) as (vm_id, listener, out, inbound):
            out.sendall(b"a" * 3000)
            assert recv_exactly(inbound, 3000) == b"a" * 3000
            inbound.sendall(b"b" * 1234)
            assert recv_exactly(out, 1234) == b"b" * 1234
            out.sendall(b"c" * 500)  # left in the ring, unread

            # Default rings: 2 pages out of the connector (one data page), 3 back (two).
            ring_bytes = (1 + 2) * 4096
            used = f'hvsock_ring_used_bytes{{path="{data_path}"}}'
            samples = _metrics(host)
            other = "relay" if data_path == "shm" else "shm"
            assert samples[f'hvsock_ring_size_bytes{{path="{data_path}"}}'] == ring_bytes
            assert samples[f'hvsock_ring_size_bytes{{path="{other}"}}'] == 0
            if data_path == "shm":
                # The 500 bytes and their packet framing (descriptor, pipe header, trailer).
                # (On the relay the host's pump has already taken them out of the ring for the
                # reader's data stream: its ring is empty until the reader stops taking frames.)
                assert 500 < samples[used] < 600
                assert samples["hvsock_shm_bytes_total"] == 3000 + 1234 + 500
                assert samples.get('hvsock_relay_bytes_total{direction="from_client"}', 0) == 0
            else:
                assert samples["hvsock_shm_bytes_total"] == 0
                # (the relay counts a frame once written on: the last may still be on its way)
                assert samples['hvsock_relay_bytes_total{direction="from_client"}'] >= 4234
            # Both ends relayed, neither past FIN: each holds its whole window of the budget.
            relayed_ends = 2 if data_path == "relay" else 0
            assert samples["hvsock_relay_window_promised_bytes"] == (
                relayed_ends * DEFAULT_RELAY_WINDOW
            )

            for sock in (out, inbound, listener):
                sock.close()
            wait_for_no_channels(host, vm_id)
            # The channel is gone: its bytes stay counted, its rings are no longer there.
            samples = _metrics(host)
            assert samples["hvsock_shm_bytes_total"] == (4734 if data_path == "shm" else 0)
            assert samples[f'hvsock_ring_used_bytes{{path="{data_path}"}}'] == 0
            assert samples[f'hvsock_ring_size_bytes{{path="{data_path}"}}'] == 0
            assert samples["hvsock_relay_window_promised_bytes"] == 0  # all given back
