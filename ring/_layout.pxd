# cython: language_level=3
#
# Layout, protocol and inline helpers of the VMBus-style ring (the contract; the
# implementation is ring/_ring.pyx). Numbers mirror ring/_constants.py (checked by a test).
#
# ---------------------------------------------------------------------------------------
# Control page (4096 bytes, u32 words, little-endian)
#   0x000 write_index    written only by the writer (release store = "publish")
#   0x004 read_index     written only by the reader (release store, per read batch)
#   0x008 interrupt_mask written only by the reader: 1 while it polls, 0 before it sleeps
#   0x00C pending_send_sz written only by the writer: free bytes it waits for, 0 = none
#   0x040 feature_bits   bit 0 = writer honours pending_send_sz
#   0x080 data_seq / 0x084 data_waiters    futex word + sleeper count, "data available"
#   0x0C0 space_seq / 0x0C4 space_waiters  futex word + sleeper count, "space available"
#   0x0C8 space_watchers  observers asleep on space_seq (see "Observers" below)
#   0x100 rescinded      0/1, set by whoever rescinds (host), never cleared
#   0x104 corrupt        0 or the reason code of the first corruption an end detected
#   0x140 bytes_written  u64 (two words, low first), written only by the writer: payload bytes
#                        written into this ring since it was initialised (FINs count 0), stored
#                        with release after each packet is published; a writer that attaches
#                        goes on from the shared value. Reported by the host (ListChannels)
#                        for ends that move bytes themselves; never used for any decision.
#   0x180 magic, 0x184 version, 0x188 data_size: identity, written at initialisation
#
# Invariants (all offsets are data-area offsets):
#   * 0 <= read_index, write_index < size and both are multiples of 8. Anything else is
#     corruption (EPROTO). Indices are loaded ONCE per operation into locals and validated.
#   * read_index == write_index means empty; the ring is never completely full
#     (a write needs free > packet length), and a data write also keeps FIN_PACKET_LEN
#     bytes, so free > 72 is needed for any payload (Linux hvs_channel_writable_bytes).
#   * Each end trusts only its own index from its private copy (w_local / r_local); if the
#     shared copy differs, someone else wrote it: corruption.
#
# Signalling (VMBus rules, Linux hv_signal_on_write / hv_pkt_iter_close):
#   writer, per packet: publish write_index; FENCE; if interrupt_mask == 0 and the ring
#     was empty before this packet (old write_index == read_index re-read AFTER the fence)
#     then data_seq += 1 and FUTEX_WAKE if data_waiters > 0.
#   reader sleeping: interrupt_mask = 0; data_waiters += 1; s = data_seq; re-check
#     write_index; FUTEX_WAIT(data_seq, s). Either the re-check sees the new packet, or
#     the writer's post-fence loads see mask == 0 and read_index == old write_index
#     (store->fence->load on both sides), and then data_seq != s or the waiter is woken.
#   reader, per batch: publish read_index; FENCE; p = pending_send_sz & ~7; if p and
#     feature bit 0 and free_before < p <= free_after (write_index re-read after the fence)
#     then space_seq += 1 and FUTEX_WAKE if space_waiters > 0.
#   writer sleeping: pending_send_sz = need; space_waiters += 1; s = space_seq; re-check
#     read_index; FUTEX_WAIT(space_seq, s); pending_send_sz = 0 when done waiting.
#   rescind / corrupt: set the flag, bump BOTH seq words, FUTEX_WAKE all on both.
#
# Observers (Ring.watch_readable / watch_writable: readiness watchers on threads other than
# the reader's and the writer's): interrupt_mask and pending_send_sz hold ONE end's state, so
# an observer must never write them (overwriting a sleeping writer's pending_send_sz, or
# setting the mask under a sleeping reader, loses that end's wake-up for good). Instead:
#   data: observer: data_waiters += 1; s = data_seq; re-check (shared write_index !=
#     shared read_index); FUTEX_WAIT. The writer signals when interrupt_mask == 0 OR
#     data_waiters > 0 (an observer may sleep while the reader polls).
#   space: observer: space_watchers += 1; s = space_seq; re-check (free >= WATCH_SPACE, one
#     1-byte packet plus the FIN reserve); FUTEX_WAIT. The reader signals also when
#     space_watchers > 0 and free_before < WATCH_SPACE <= free_after, and wakes when
#     space_waiters or space_watchers > 0.
#
# Wait sets (WaitSet: one thread sleeps on up to WAITSET_CAPACITY rings at once with
# futex_waitv, each word armed with the protocol above, never with a spin):
#   data: as an observer (data_waiters += 1 while armed; ready when the observer's condition
#     holds), so it may be armed whatever the reader did last.
#   space: as the writer's DELEGATE, for a writer that has handed its waiting over and runs
#     no ring call until the set has disarmed the entry (the hand-over orders the two):
#     pending_send_sz = need; space_waiters += 1; ready when the writer's own condition
#     (free >= need, from its private write index) holds; disarming stores
#     pending_send_sz = 0. The reader then signals exactly as for the writer itself.
#   Arming happens once per entry (the counts stay raised while it is in the set); every
#   round of the set reads each entry's sequence word, THEN re-checks its condition, then
#   sleeps on all the words read, so a signal between the read and the sleep is never lost.
#   Each armed entry keeps its Ring busy (close() refuses, EBUSY) until disarmed.
# ---------------------------------------------------------------------------------------

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset


cdef extern from "_hvring.h" nogil:
    uint32_t hv_load_relaxed(const uint32_t *p)
    uint32_t hv_load_acquire(const uint32_t *p)
    uint32_t hv_load_seq(const uint32_t *p)
    void hv_store_relaxed(uint32_t *p, uint32_t v)
    void hv_store_release(uint32_t *p, uint32_t v)
    void hv_store_seq(uint32_t *p, uint32_t v)
    uint32_t hv_fetch_add(uint32_t *p, uint32_t v)
    uint32_t hv_fetch_sub(uint32_t *p, uint32_t v)
    uint32_t hv_fetch_or(uint32_t *p, uint32_t v)
    uint64_t hv_load64_acquire(const uint64_t *p)
    void hv_store64_release(uint64_t *p, uint64_t v)
    void hv_fence()
    void hv_cpu_relax()
    void hv_yield()
    int64_t hv_now_ns()
    int hv_futex_wait(uint32_t *addr, uint32_t expected, int64_t timeout_ns)
    int hv_futex_wake(uint32_t *addr, int n)
    int hv_futex_wake_private(uint32_t *addr, int n)
    enum: HV_WAITV_MAX, HV_FUTEX2_SIZE_U32, HV_FUTEX2_PRIVATE
    struct hv_waitv:
        uint64_t val
        uint64_t uaddr
        uint32_t flags
        uint32_t reserved
    int hv_futex_waitv(hv_waitv *waiters, unsigned int n, int64_t deadline_ns)


cdef enum:
    PAGE_SIZE = 4096
    CONTROL_PAGE_SIZE = 4096

    # u32 word indices into the control page (byte offset / 4)
    W_WRITE_INDEX = 0  # byte offset 0x000
    W_READ_INDEX = 1  # byte offset 0x004
    W_INTERRUPT_MASK = 2  # byte offset 0x008
    W_PENDING_SEND_SZ = 3  # byte offset 0x00C
    W_FEATURE_BITS = 16  # byte offset 0x040
    W_DATA_SEQ = 32  # byte offset 0x080
    W_DATA_WAITERS = 33  # byte offset 0x084
    W_SPACE_SEQ = 48  # byte offset 0x0C0
    W_SPACE_WAITERS = 49  # byte offset 0x0C4
    W_SPACE_WATCHERS = 50  # byte offset 0x0C8
    W_RESCINDED = 64  # byte offset 0x100
    W_CORRUPT = 65  # byte offset 0x104
    W_BYTES_WRITTEN = 80  # byte offset 0x140, a u64 (words 80 and 81)
    W_MAGIC = 96  # byte offset 0x180
    W_VERSION = 97  # byte offset 0x184
    W_DATA_SIZE = 98  # byte offset 0x188

    FEAT_PENDING_SEND_SZ = 1
    RING_MAGIC = 0x52535648
    RING_VERSION = 1

    VM_PKT_DATA_INBAND = 6
    PIPE_PKT_DATA = 1
    HEADER_SIZE = 24
    TRAILER_SIZE = 8
    MAX_PAYLOAD = 16384
    FIN_PACKET_LEN = 32
    WRITE_RESERVE = 72
    WATCH_SPACE = 80  # packet_len(1) + FIN_PACKET_LEN + 8: what wait_writable(1) waits for
    MIN_RING_PAGES = 2
    WAITSET_CAPACITY = 127  # futex_waitv takes 128 words; one is the set's own wake-up word

    # status codes (ring/_errors.py)
    ST_OK = 0
    ST_AGAIN = -1
    ST_TIMEOUT = -2
    ST_RESCINDED = -3
    ST_FIN_SENT = -4
    ST_INTR = -5
    ST_CORRUPT = -6
    ST_CLOSED = -7

    # corruption reasons (ring/_errors.py)
    CORRUPT_WRITE_INDEX = 1
    CORRUPT_READ_INDEX = 2
    CORRUPT_SHORT_PACKET = 3
    CORRUPT_DESC_TYPE = 4
    CORRUPT_OFFSET8 = 5
    CORRUPT_LEN8 = 6
    CORRUPT_PIPE_TYPE = 7
    CORRUPT_DATA_SIZE = 8
    CORRUPT_TRAILER = 9
    CORRUPT_INDEX_MOVED = 10
    CORRUPT_PARTIAL = 11
    CORRUPT_PEER = 12
    CORRUPT_IDENTITY = 13
    MIN_SPIN_NS = 2000
    SPIN_YIELD_AFTER_NS = 10000
    SPIN_ACTIVE_FACTOR = 10


# The 24-byte packet header (descriptor + pipe header), as laid out in the ring.
cdef packed struct pkt_header:
    uint16_t type
    uint16_t offset8
    uint16_t len8
    uint16_t flags
    uint64_t trans_id
    uint32_t pkt_type
    uint32_t data_size


# Per-end state of one ring. `ctl` and `data` point into caller-owned memory that the
# owning Ring object keeps exported (Py_buffer) for as long as this struct is used.
cdef struct hvring:
    uint32_t *ctl        # control page as u32 words
    uint8_t *data        # data area
    uint32_t size        # data-area bytes (multiple of 4096)
    uint32_t max_payload # effective per-packet payload limit for writes
    uint32_t w_local     # writer's private copy of write_index
    uint32_t r_local     # reader's private copy of read_index
    uint32_t partial     # reader: bytes of the head packet's payload already consumed
    uint64_t total_written  # writer's private copy of the control page's bytes_written
    int eof              # reader: FIN consumed
    int fin_sent         # writer: FIN written
    int64_t spin_max_ns  # adaptive spin bounds; spin_max_ns == 0 disables spinning
    int64_t spin_ns      # current spin budget
    # corruption details for the error message (reason also goes to ctl[W_CORRUPT])
    int corrupt_reason
    uint64_t corrupt_a
    uint64_t corrupt_b
    # statistics (local to this end)
    uint64_t bytes_written
    uint64_t bytes_read
    uint64_t packets_written
    uint64_t packets_read
    uint64_t signals_sent     # data signals by the writer + space signals by the reader
    uint64_t wakes_issued     # FUTEX_WAKE syscalls made
    uint64_t sleeps           # FUTEX_WAIT syscalls made
    uint64_t spin_hits        # waits satisfied while spinning


cdef inline uint32_t roundup8(uint32_t n) noexcept nogil:
    return (n + 7) & ~(<uint32_t>7)


cdef inline uint32_t packet_len(uint32_t n) noexcept nogil:
    return HEADER_SIZE + roundup8(n) + TRAILER_SIZE


# Bytes used / free for indices already validated (hv_get_bytes_to_read / to_write).
cdef inline uint32_t ring_used(uint32_t w, uint32_t r, uint32_t size) noexcept nogil:
    return w - r if w >= r else size - r + w


cdef inline uint32_t ring_free(uint32_t w, uint32_t r, uint32_t size) noexcept nogil:
    return size - (w - r) if w >= r else r - w


cdef inline bint index_ok(uint32_t i, uint32_t size) noexcept nogil:
    return i < size and (i & 7) == 0


# Copy into / out of the data area at `off` (< size), wrapping at the end: two memcpys.
cdef inline void ring_put(hvring *rg, uint32_t off, const void *src, uint32_t n) noexcept nogil:
    cdef uint32_t first = rg.size - off
    if n <= first:
        memcpy(rg.data + off, src, n)  # all of it fits before the wrap point
    else:
        memcpy(rg.data + off, src, first)
        memcpy(rg.data, <const uint8_t *>src + first, n - first)


cdef inline void ring_zero(hvring *rg, uint32_t off, uint32_t n) noexcept nogil:
    cdef uint32_t first = rg.size - off
    if n <= first:
        memset(rg.data + off, 0, n)
    else:
        memset(rg.data + off, 0, first)
        memset(rg.data, 0, n - first)


cdef inline void ring_get(hvring *rg, uint32_t off, void *dst, uint32_t n) noexcept nogil:
    cdef uint32_t first = rg.size - off
    if n <= first:
        memcpy(dst, rg.data + off, n)
    else:
        memcpy(dst, rg.data + off, first)
        memcpy(<uint8_t *>dst + first, rg.data, n - first)


cdef inline uint32_t ring_add(uint32_t off, uint32_t n, uint32_t size) noexcept nogil:
    # off < size and n <= size, so one conditional subtraction is enough (no division)
    off += n
    return off - size if off >= size else off
