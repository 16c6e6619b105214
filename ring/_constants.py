"""Layout constants shared by the Cython ring, its pure-Python twin and the shared-memory channel.

The C side declares the same numbers in ``ring/_layout.pxd``; ``tests/unit/ring`` checks that
the two agree. All offsets are bytes from the start of a ring's control page.

Ring = one 4096-byte control page + a data area of whole 4 KiB pages (VMBus ``hv_ring_buffer``)::

    0x000  u32 write_index      next byte the writer will fill (data-area offset, multiple of 8)
    0x004  u32 read_index       next unread byte (data-area offset, multiple of 8)
    0x008  u32 interrupt_mask   1 = reader is polling, do not signal it
    0x00C  u32 pending_send_sz  free bytes the blocked writer needs before it wants a signal
    0x010  reserved1[12]        (VMBus reserved, left zero)
    0x040  u32 feature_bits     bit 0: writer supports pending_send_sz (set at initialisation)
    --- emulator extension, in VMBus reserved2, each group on its own 64-byte cache line ---
    0x080  u32 data_seq         futex word: bumped by every "data available" signal
    0x084  u32 data_waiters     readers asleep (or about to sleep) on data_seq
    0x0C0  u32 space_seq        futex word: bumped by every "space available" signal
    0x0C4  u32 space_waiters    writers asleep (or about to sleep) on space_seq
    0x0C8  u32 space_watchers   observers (readiness watchers) asleep on space_seq
    0x100  u32 rescinded        1 = channel rescinded: writes fail, reads drain then EOF
    0x104  u32 corrupt          non-zero = an end found the ring corrupt (reason code)
    0x140  u64 bytes_written    payload bytes written since initialisation (writer only; the
                                host reports it, never trusts it)
    0x180  u32 magic            RING_MAGIC, written at initialisation
    0x184  u32 version          RING_VERSION
    0x188  u32 data_size        size of the data area, so an attacher can check its mapping

Packet (in-band VMBus packet carrying a VMBus-pipe payload), all little-endian::

    +0   u16 type = 6 (VM_PKT_DATA_INBAND)   u16 offset8 = 2   u16 len8   u16 flags = 0
    +8   u64 trans_id = 0
    +16  u32 pkt_type = 1 (DATA)             u32 data_size (0 = FIN)
    +24  payload, zero-padded to a multiple of 8
    +len8*8  u64 trailer = (write_index at packet start) << 32
"""

from __future__ import annotations

PAGE_SIZE = 4096
CONTROL_PAGE_SIZE = 4096

OFF_WRITE_INDEX = 0x000
OFF_READ_INDEX = 0x004
OFF_INTERRUPT_MASK = 0x008
OFF_PENDING_SEND_SZ = 0x00C
OFF_FEATURE_BITS = 0x040
OFF_DATA_SEQ = 0x080
OFF_DATA_WAITERS = 0x084
OFF_SPACE_SEQ = 0x0C0
OFF_SPACE_WAITERS = 0x0C4
OFF_SPACE_WATCHERS = 0x0C8
OFF_RESCINDED = 0x100
OFF_CORRUPT = 0x104
OFF_BYTES_WRITTEN = 0x140
OFF_MAGIC = 0x180
OFF_VERSION = 0x184
OFF_DATA_SIZE = 0x188

# The same words as u32 indices into the control page (byte offset / 4), the form
# ring/_layout.pxd declares them in (W_BYTES_WRITTEN is a u64: words 80 (low) and 81 (high)).
W_WRITE_INDEX = OFF_WRITE_INDEX // 4
W_READ_INDEX = OFF_READ_INDEX // 4
W_INTERRUPT_MASK = OFF_INTERRUPT_MASK // 4
W_PENDING_SEND_SZ = OFF_PENDING_SEND_SZ // 4
W_FEATURE_BITS = OFF_FEATURE_BITS // 4
W_DATA_SEQ = OFF_DATA_SEQ // 4
W_DATA_WAITERS = OFF_DATA_WAITERS // 4
W_SPACE_SEQ = OFF_SPACE_SEQ // 4
W_SPACE_WAITERS = OFF_SPACE_WAITERS // 4
W_SPACE_WATCHERS = OFF_SPACE_WATCHERS // 4
W_RESCINDED = OFF_RESCINDED // 4
W_CORRUPT = OFF_CORRUPT // 4
W_BYTES_WRITTEN = OFF_BYTES_WRITTEN // 4
W_MAGIC = OFF_MAGIC // 4
W_VERSION = OFF_VERSION // 4
W_DATA_SIZE = OFF_DATA_SIZE // 4

FEAT_PENDING_SEND_SZ = 1
RING_MAGIC = 0x52535648  # b"HVSR" little-endian
RING_VERSION = 1

VM_PKT_DATA_INBAND = 6
PIPE_PKT_DATA = 1
DESCRIPTOR_SIZE = 16
PIPE_HEADER_SIZE = 8
HEADER_SIZE = DESCRIPTOR_SIZE + PIPE_HEADER_SIZE  # 24, HVS_HEADER_LEN
TRAILER_SIZE = 8

MAX_PAYLOAD = 16384  # MAX_PIPE_DATA_PAYLOAD / HVS_MTU_SIZE
LINUX_GUEST_MAX_PAYLOAD = 4088  # HVS_SEND_BUF_SIZE
FIN_PACKET_LEN = 32  # packet_len(0)
# A data write must leave more than FIN_PACKET_LEN bytes free, and the ring may never be
# completely full, so a payload fits only if free > packet_len(1) + packet_len(0) = 72
# (Linux hvs_channel_writable_bytes).
WRITE_RESERVE = 72

MIN_RING_PAGES = 2  # control page + one data page (the seed's send ring)
MAX_RING_PAGES = 64  # RINGBUFFER_HVS_MAX_SIZE
DEFAULT_SEND_PAGES = 2
DEFAULT_RECV_PAGES = 3

DEFAULT_SPIN_NS = 100_000  # upper bound of the adaptive spin before a futex sleep
MIN_SPIN_NS = 2_000
# A wait that ended within SPIN_ACTIVE_FACTOR spin budgets means the peer is active: keep
# the full budget; otherwise halve it (down to MIN_SPIN_NS).
SPIN_ACTIVE_FACTOR = 10


def roundup8(n: int) -> int:
    """Round ``n`` up to a multiple of 8."""
    return (n + 7) & ~7


def packet_len(n: int) -> int:
    """Ring bytes of a packet with an ``n``-byte payload: 24 + roundup8(n) + 8 (HVS_PKT_LEN)."""
    if n < 0:
        raise ValueError("payload length must be >= 0")
    return HEADER_SIZE + roundup8(n) + TRAILER_SIZE


# Free bytes that make a ring writable for a 1-byte send (what wait_writable(1) waits for): the
# threshold readiness observers sleep on. ring/_layout.pxd spells it out as 80.
WATCH_SPACE = packet_len(1) + FIN_PACKET_LEN + 8

# Ring waits one WaitSet holds: futex_waitv(2) takes at most 128 words, and one is the set's own
# wake-up word.
WAITSET_CAPACITY = 127


def ring_bytes(pages: int) -> int:
    """Total bytes (control page + data area) of a ring of ``pages`` 4 KiB pages."""
    if pages < MIN_RING_PAGES:
        raise ValueError(f"a ring needs at least {MIN_RING_PAGES} pages, not {pages}")
    return pages * PAGE_SIZE


def effective_max_payload(data_size: int, max_payload: int) -> int:
    """Largest payload one packet can carry in a data area of ``data_size`` bytes.

    A packet must fit an empty ring while keeping the FIN reserve: payload <= data_size - 72.
    """
    return min(max_payload, (data_size - WRITE_RESERVE) & ~7)


def ring_capacity(pages: int, max_payload: int) -> int:
    """Payload bytes an empty ring of ``pages`` pages takes without blocking: what a fresh
    ``Ring``'s ``writable()`` says (a relayed end is told it before any ring exists)."""
    size = pages * PAGE_SIZE - CONTROL_PAGE_SIZE
    largest = effective_max_payload(size, max_payload)
    free, total = size, 0
    while free > WRITE_RESERVE:
        payload = min(free - WRITE_RESERVE, largest)
        total += payload
        free -= packet_len(payload)
    return total
