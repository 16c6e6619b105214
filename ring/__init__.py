"""VMBus-style single-producer/single-consumer byte rings in shared memory.

``Ring`` wraps one ring (control page + data pages) in any writable buffer; ``Channel`` is two
rings in one sealed anonymous segment (``memfd``) whose descriptor two processes share. The
compiled core (``ring._ring``) is used unless ``HVSOCK_RING_IMPL=python`` asks for the
pure-Python twin (``ring._pyring``), which has the same API and byte layout. Layout and
protocol: ``ring/_constants.py`` and ``ring/_layout.pxd``.
"""

from ._constants import (
    CONTROL_PAGE_SIZE,
    DEFAULT_RECV_PAGES,
    DEFAULT_SEND_PAGES,
    DEFAULT_SPIN_NS,
    FIN_PACKET_LEN,
    HEADER_SIZE,
    LINUX_GUEST_MAX_PAYLOAD,
    MAX_PAYLOAD,
    MAX_RING_PAGES,
    MIN_RING_PAGES,
    PAGE_SIZE,
    TRAILER_SIZE,
    WRITE_RESERVE,
    effective_max_payload,
    packet_len,
    ring_bytes,
    ring_capacity,
    roundup8,
)
from ._errors import RingCorruptError
from ._impl import IMPLEMENTATION, Ring
from .shm import Channel

__all__ = [
    "CONTROL_PAGE_SIZE",
    "DEFAULT_RECV_PAGES",
    "DEFAULT_SEND_PAGES",
    "DEFAULT_SPIN_NS",
    "FIN_PACKET_LEN",
    "HEADER_SIZE",
    "IMPLEMENTATION",
    "LINUX_GUEST_MAX_PAYLOAD",
    "MAX_PAYLOAD",
    "MAX_RING_PAGES",
    "MIN_RING_PAGES",
    "PAGE_SIZE",
    "TRAILER_SIZE",
    "WRITE_RESERVE",
    "Channel",
    "Ring",
    "RingCorruptError",
    "effective_max_payload",
    "packet_len",
    "ring_bytes",
    "ring_capacity",
    "roundup8",
]
