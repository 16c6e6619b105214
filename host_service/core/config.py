"""Limits and policy switches of the emulated host, with the seed patch's names and defaults.

``send_ring_page`` / ``recv_ring_page`` / ``max_socket_number`` are the module parameters of the
2016 hv_sock v11 cover letter this project started from (2, 3, 1024).  Ring page counts include
the 4 KiB control page, as in the patch's DEF_RINGBUFFER_PAGES_HVSOCK_SND/RCV.  The later kernel
allows up to 64 pages per direction when requested before connect (``max_ring_pages``).
"""

from __future__ import annotations

from dataclasses import dataclass

from host_service.core.errors import InvalidArgument

__all__ = ["HVSOCKET_CONNECT_TIMEOUT_MAX_MS", "HostConfig"]

#: Windows' HVSOCKET_CONNECT_TIMEOUT_MAX: the largest per-socket connect timeout (5 minutes).
HVSOCKET_CONNECT_TIMEOUT_MAX_MS = 300_000


@dataclass(frozen=True, slots=True, kw_only=True)
class HostConfig:
    """Immutable configuration; validated at construction (raises :class:`InvalidArgument`)."""

    #: Sockets per partition: listeners plus channel ends (see HostCore docs). Seed default 1024.
    #: Counted per partition across all its sessions, as Hyper-V counts per VM.
    max_socket_number: int = 1024
    #: Live sessions (attach streams: processes) one partition may have at once.
    max_sessions_per_partition: int = 64
    #: VM partitions the host keeps at once (the host partition not counted).  Bounds what
    #: anonymous attaches can create under ``auto_create_on_attach``: every VM costs memory
    #: and a row in the state file for ever.
    max_partitions: int = 1024
    #: Default pages of the guest's send ring (guest -> host), control page included.
    send_ring_page: int = 2
    #: Default pages of the guest's receive ring (host -> guest), control page included.
    recv_ring_page: int = 3
    #: Largest ring a connection may request, per direction (RINGBUFFER_HVS_MAX_SIZE = 64 pages).
    max_ring_pages: int = 64
    #: Connect timeout when the caller sets none (Linux VSOCK_DEFAULT_CONNECT_TIMEOUT, 2 s).
    connect_timeout: float = 2.0
    #: Upper bound of a per-connect timeout, in ms (HVSOCKET_CONNECT_TIMEOUT_MAX).
    max_connect_timeout_ms: int = HVSOCKET_CONNECT_TIMEOUT_MAX_MS
    #: How long a closing channel waits for the peer before the host rescinds (HVS_CLOSE_TIMEOUT).
    close_timeout: float = 8.0
    #: Host listeners need a registered service (GuestCommunicationServices gate).
    strict_registry: bool = False
    #: Allow VM -> VM connects (not possible on real Hyper-V; an explicit extension).
    allow_guest_to_guest: bool = False
    #: Backlog used when a listen request gives none (CPython's default, min(SOMAXCONN, 128)).
    default_backlog: int = 128
    #: Larger backlogs are clamped to this, as the kernel clamps to somaxconn.
    max_backlog: int = 65_535
    #: Attach without a VM id creates a fresh Linux VM (convenience for local quick starts).
    auto_create_on_attach: bool = False
    #: Lifecycle events kept for diagnostics streams that start late.
    event_log_size: int = 4096

    def __post_init__(self) -> None:
        positive_ints = {
            "max_socket_number": self.max_socket_number,
            "max_sessions_per_partition": self.max_sessions_per_partition,
            "max_partitions": self.max_partitions,
            "send_ring_page": self.send_ring_page,
            "recv_ring_page": self.recv_ring_page,
            "max_ring_pages": self.max_ring_pages,
            "max_connect_timeout_ms": self.max_connect_timeout_ms,
            "max_backlog": self.max_backlog,
            "event_log_size": self.event_log_size,
        }
        for name, value in positive_ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"{name} must be a positive integer, got {value!r}")
        # A ring needs its control page plus at least one data page.
        for name in ("send_ring_page", "recv_ring_page"):
            pages = getattr(self, name)
            if not 2 <= pages <= self.max_ring_pages:
                raise InvalidArgument(
                    f"{name} must be between 2 and max_ring_pages ({self.max_ring_pages}), "
                    f"got {pages}"
                )
        if not 0 < self.connect_timeout <= self.max_connect_timeout_ms / 1000:
            raise InvalidArgument(
                f"connect_timeout must be in (0, {self.max_connect_timeout_ms / 1000}] s, "
                f"got {self.connect_timeout}"
            )
        if not self.close_timeout > 0:
            raise InvalidArgument(f"close_timeout must be > 0 s, got {self.close_timeout}")
        if not 0 <= self.default_backlog <= self.max_backlog:
            raise InvalidArgument(
                f"default_backlog must be in [0, max_backlog={self.max_backlog}], "
                f"got {self.default_backlog}"
            )
