"""Ring geometry: how many pages each direction of a channel's rings gets.

Defaults come from ``send_ring_page``/``recv_ring_page`` seen from the VM end of the channel (the
seed's module parameters are the guest's rings); for host loopback and VM->VM channels from the
connector.  Each direction is the largest of the default, the connector's request and the
listener's request, clamped to ``max_ring_pages`` (Linux clamps SO_SNDBUF/SO_RCVBUF the same
way).  Geometry is fixed when the channel is offered.

Pure functions of the configuration and the records passed in; they change nothing.
"""

from __future__ import annotations

from host_service.core.config import HostConfig
from host_service.core.errors import InvalidArgument
from host_service.core.records import _Listener, _Partition
from host_service.core.types import RingGeometry

__all__ = ["geometry", "ring_request"]


def ring_request(config: HostConfig, pages: int | None, what: str) -> int | None:
    """A requested page count (``send_pages``/``recv_pages`` of listen or connect), clamped.

    Raises:
        InvalidArgument: not a positive integer.
    """
    if pages is None:
        return None
    if isinstance(pages, bool) or not isinstance(pages, int) or pages < 1:
        raise InvalidArgument(f"{what} must be a positive number of pages, got {pages!r}")
    return min(pages, config.max_ring_pages)


def geometry(
    config: HostConfig,
    connector: _Partition,
    acceptor: _Partition,
    req_send: int | None,
    req_recv: int | None,
    listener: _Listener | None,
) -> RingGeometry:
    """Connector-view ring geometry (see the module docstring); ``listener`` None before the
    channel is offered."""
    send_default = config.send_ring_page
    recv_default = config.recv_ring_page
    if connector.is_host and not acceptor.is_host:
        # The VM is the acceptor: the defaults are its view, so swap for the connector.
        send_default, recv_default = recv_default, send_default
    send = max(send_default, req_send or 0, (listener.recv_pages if listener else None) or 0)
    recv = max(recv_default, req_recv or 0, (listener.send_pages if listener else None) or 0)
    limit = config.max_ring_pages
    return RingGeometry(min(send, limit), min(recv, limit))
