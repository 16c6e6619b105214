"""In-memory socket pairs for fast unit tests: no host service, no gRPC, no /dev/shm.

``socketpair()`` returns two connected :class:`HvSocket` objects whose pipe is a pair of
private rings, so tests exercise the same socket code as the real data paths.
"""

from __future__ import annotations

import uuid

from hvsock.v1 import hvsock_pb2
from hvsock_common import addresses

from ._channel import ChannelEnd
from ._pipe import memory_pair
from ._socket import AF_HYPERV, HV_PROTOCOL_RAW, HvSocket


class _Detached:
    """The control plane of an in-memory pair: nothing to tell a host."""

    personality = "linux"
    shm = False
    limits = hvsock_pb2.Limits(
        send_ring_page=2, recv_ring_page=3, connect_timeout_ms=2000, max_ring_page=64
    )

    def notify(self, **kwargs: object) -> None:
        return None

    def forget(self, end: ChannelEnd) -> None:
        return None


def socketpair(
    send_pages: int = 2, recv_pages: int = 3, max_payload: int = 16384
) -> tuple[HvSocket, HvSocket]:
    """(guest end, host end): the guest end writes ``send_pages`` rings, as a VM would."""
    a_pipe, b_pipe = memory_pair(send_pages, recv_pages, max_payload)
    vm = str(uuid.uuid4())
    guest = addresses.Address(vm, addresses.service_id_for_port(1024))
    host = addresses.Address(addresses.PARENT, addresses.service_id_for_port(5000))
    detached = _Detached()
    sockets = []
    for pipe, local, remote, pages in (
        (a_pipe, guest, host, (send_pages, recv_pages)),
        (b_pipe, host, guest, (recv_pages, send_pages)),
    ):
        channel = hvsock_pb2.Channel(
            channel_id=1,
            local=hvsock_pb2.Address(vm_id=local.vm_id, service_id=local.service_id),
            remote=hvsock_pb2.Address(vm_id=remote.vm_id, service_id=remote.service_id),
            geometry=hvsock_pb2.RingGeometry(
                send_ring_pages=pages[0], recv_ring_pages=pages[1], max_payload=max_payload
            ),
        )
        end = ChannelEnd(detached, channel, pipe)  # type: ignore[arg-type]
        sockets.append(HvSocket(detached, AF_HYPERV, 1, HV_PROTOCOL_RAW, _end=end))  # type: ignore[arg-type]
    return sockets[0], sockets[1]
