# cython: language_level=3
"""VMBus-style SPSC byte ring over caller-owned memory (the compiled core).

Layout, invariants and the signalling protocol are documented in ``ring/_layout.pxd``; the
Python-level contract (and the pure-Python twin that must agree byte for byte) in
``ring/_pyring.py``. Structure of this file:

* ``nogil`` core functions (``_w_*``, ``_r_*``, ``_wait``): plain C, never raise, never
  allocate, return ``ST_*`` status codes;
* the ``Ring`` class: acquires the caller's buffers, releases the GIL around the core, and
  converts a failed status to an exception in exactly one place (``Ring._fail``);
* the ``WaitSet`` class: one thread sleeping on many rings' futex words at once
  (``futex_waitv``), for readiness watchers that must not cost a thread per ring;
* small module-level helpers (atomics and futex on any buffer) for ``ring.shm``.
"""

from cpython.buffer cimport (
    PyBUF_SIMPLE,
    PyBUF_WRITABLE,
    PyBuffer_Release,
    PyObject_GetBuffer,
)
cimport cython
from cpython.exc cimport PyErr_CheckSignals
from libc.errno cimport EINTR, ENOSYS, ETIMEDOUT
from libc.limits cimport INT_MAX
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memset

from ring._layout cimport *

import os as _os

from ring._constants import DEFAULT_SPIN_NS as _PY_DEFAULT_SPIN_NS
from ring._errors import status_error as _status_error

__all__ = [
    "Ring",
    "WaitSet",
    "atomic_fetch_or",
    "atomic_load",
    "atomic_store",
    "futex_wait",
    "futex_wake",
]

cdef int64_t _DEFAULT_SPIN_NS = int(_os.environ.get("HVSOCK_RING_SPIN_NS", str(_PY_DEFAULT_SPIN_NS)))


# ------------------------------------------------------------------------------------------
# nogil core
# ------------------------------------------------------------------------------------------

cdef void _wake_all(uint32_t *ctl) noexcept nogil:
    """Bump both futex words and wake every sleeper (rescind / corruption)."""
    hv_fetch_add(&ctl[W_DATA_SEQ], 1)
    hv_fetch_add(&ctl[W_SPACE_SEQ], 1)
    hv_futex_wake(&ctl[W_DATA_SEQ], INT_MAX)
    hv_futex_wake(&ctl[W_SPACE_SEQ], INT_MAX)


cdef int _corrupt(hvring *rg, int reason, uint64_t a, uint64_t b) noexcept nogil:
    """Record a corruption, publish it in the control page (first reporter wins), wake all."""
    rg.corrupt_reason = reason
    rg.corrupt_a = a
    rg.corrupt_b = b
    if hv_load_seq(&rg.ctl[W_CORRUPT]) == 0:
        hv_store_seq(&rg.ctl[W_CORRUPT], <uint32_t>reason)
    _wake_all(rg.ctl)
    return ST_CORRUPT


cdef int _flags(hvring *rg) noexcept nogil:
    """ST_CORRUPT if any end marked the ring corrupt, else ST_OK."""
    cdef uint32_t c = hv_load_acquire(&rg.ctl[W_CORRUPT])
    if c != 0:
        if rg.corrupt_reason == 0:
            # learned from the control page: the other end (or a hostile peer) found it
            rg.corrupt_reason = CORRUPT_PEER
            rg.corrupt_a = c
            rg.corrupt_b = 0
        return ST_CORRUPT
    return ST_OK


cdef bint _cond_data(hvring *rg) noexcept nogil:
    # True when a read would not block: a packet, a rescind or a corruption to report.
    return (hv_load_acquire(&rg.ctl[W_WRITE_INDEX]) != rg.r_local
            or hv_load_relaxed(&rg.ctl[W_RESCINDED]) != 0
            or hv_load_relaxed(&rg.ctl[W_CORRUPT]) != 0)


cdef bint _cond_space(hvring *rg, uint32_t need) noexcept nogil:
    # True when `need` bytes are free, or there is a rescind/corruption to report.
    cdef uint32_t r = hv_load_acquire(&rg.ctl[W_READ_INDEX])
    if not index_ok(r, rg.size) or not index_ok(rg.w_local, rg.size):
        return True  # the caller's validation reports it
    return (ring_free(rg.w_local, r, rg.size) >= need
            or hv_load_relaxed(&rg.ctl[W_RESCINDED]) != 0
            or hv_load_relaxed(&rg.ctl[W_CORRUPT]) != 0)


cdef inline bint _cond(hvring *rg, bint space, uint32_t need) noexcept nogil:
    return _cond_space(rg, need) if space else _cond_data(rg)


ctypedef bint (*_ready_fn)(hvring *rg, bint space, uint32_t need) noexcept nogil


cdef int _sleep(hvring *rg, uint32_t *seq, uint32_t *count, _ready_fn ready, bint space,
                uint32_t need, int64_t deadline, uint64_t *sleeps) noexcept nogil:
    """Sleep on the futex word ``seq`` until ``ready``, the deadline, or a signal (EINTR),
    counted in ``*count`` meanwhile. Count, read the sequence, re-check, and only then sleep:
    a signal after the read changes the word, so FUTEX_WAIT returns at once instead of losing
    the wake-up. Returns ST_OK, ST_TIMEOUT or ST_INTR."""
    cdef uint32_t s
    cdef int64_t t, remaining
    cdef int rc, st
    hv_fetch_add(count, 1)
    while True:
        s = hv_load_seq(seq)
        if ready(rg, space, need):
            st = ST_OK
            break
        remaining = -1
        if deadline > 0:
            t = hv_now_ns()
            if t >= deadline:
                st = ST_TIMEOUT
                break
            remaining = deadline - t
        if sleeps != NULL:
            sleeps[0] += 1
        rc = hv_futex_wait(seq, s, remaining)
        if rc == EINTR:
            st = ST_INTR
            break
        # 0 (woken), EAGAIN (already changed), ETIMEDOUT: loop and re-evaluate
    hv_fetch_sub(count, 1)
    return st


cdef int _wait(hvring *rg, bint space, uint32_t need, int64_t deadline) noexcept nogil:
    """Wait for data (space=0) or for `need` free bytes (space=1).

    deadline: absolute CLOCK_MONOTONIC ns, -1 = forever, 0 = do not wait.
    Returns ST_OK when the condition holds (the caller re-evaluates everything),
    ST_AGAIN, ST_TIMEOUT or ST_INTR.
    """
    cdef uint32_t *ctl = rg.ctl
    cdef uint32_t *seq
    cdef uint32_t *waiters
    cdef int64_t t0, t, spin_end
    cdef int st
    cdef unsigned int i
    if _cond(rg, space, need):
        return ST_OK
    if deadline == 0:
        return ST_AGAIN
    t0 = hv_now_ns()
    if deadline > 0 and t0 >= deadline:
        return ST_TIMEOUT
    if space:
        # VMBus: tell the reader how much space we wait for; it signals when it frees
        # enough. Stored before the re-checks below (store -> fence -> load, see .pxd).
        hv_store_seq(&ctl[W_PENDING_SEND_SZ], need)
    else:
        # hv_begin_read: we poll, the writer need not signal us.
        hv_store_relaxed(&ctl[W_INTERRUPT_MASK], 1)

    # Phase 1: bounded busy-wait. A futex round trip between vCPUs costs tens of
    # microseconds; a peer that answers within the budget costs well under one.
    if rg.spin_ns > 0:
        spin_end = t0 + rg.spin_ns
        if deadline > 0 and deadline < spin_end:
            spin_end = deadline
        i = 0
        while True:
            if _cond(rg, space, need):
                rg.spin_hits += 1
                if space:
                    hv_store_relaxed(&ctl[W_PENDING_SEND_SZ], 0)
                return ST_OK
            hv_cpu_relax()
            i += 1
            if (i & 31) == 0:
                t = hv_now_ns()
                if t >= spin_end:
                    break
                if t - t0 > SPIN_YIELD_AFTER_NS:
                    # Past the first microseconds, let a peer that shares our CPU run:
                    # spinning on a CPU the peer needs only delays the event we wait for.
                    hv_yield()

    # Phase 2: sleep on the sequence word, counted in the waiters (with interrupt_mask = 0
    # for a reader: signal me from now on).
    if space:
        seq = &ctl[W_SPACE_SEQ]
        waiters = &ctl[W_SPACE_WAITERS]
    else:
        seq = &ctl[W_DATA_SEQ]
        waiters = &ctl[W_DATA_WAITERS]
        hv_store_seq(&ctl[W_INTERRUPT_MASK], 0)  # hv_end_read: signal me from now on
    st = _sleep(rg, seq, waiters, _cond, space, need, deadline, &rg.sleeps)
    if space:
        hv_store_relaxed(&ctl[W_PENDING_SEND_SZ], 0)

    # Adapt: while the peer is active (this wait ended within SPIN_ACTIVE_FACTOR budgets,
    # the sleep having cost us a futex round trip, which inside a VM can exceed the budget
    # itself) spin the full budget next time; when it is idle, halve the budget so a quiet
    # channel does not cost a core. Halving on every missed spin instead collapses both
    # ends into futex ping-pong, each sleep making the other end's wait longer.
    if rg.spin_max_ns > 0:
        t = hv_now_ns() - t0
        if st == ST_OK and t <= rg.spin_max_ns * SPIN_ACTIVE_FACTOR:
            rg.spin_ns = rg.spin_max_ns
        else:
            rg.spin_ns = rg.spin_ns // 2
            if rg.spin_ns < MIN_SPIN_NS:
                rg.spin_ns = MIN_SPIN_NS
    return st


cdef bint _watched(hvring *rg, bint space, uint32_t need) noexcept nogil:
    # An observer's condition (``need`` is always WATCH_SPACE): only shared words, the
    # ends' private copies being theirs.
    cdef uint32_t w = hv_load_acquire(&rg.ctl[W_WRITE_INDEX])
    cdef uint32_t r = hv_load_acquire(&rg.ctl[W_READ_INDEX])
    if hv_load_relaxed(&rg.ctl[W_RESCINDED]) != 0 or hv_load_relaxed(&rg.ctl[W_CORRUPT]) != 0:
        return True
    if not index_ok(w, rg.size) or not index_ok(r, rg.size):
        return True  # the ends' next operation reports it
    return ring_free(w, r, rg.size) >= WATCH_SPACE if space else w != r


cdef int _watch(hvring *rg, bint space, int64_t deadline) noexcept nogil:
    """An observer's wait for data (space=0) or for room for a 1-byte write (space=1).

    Never writes interrupt_mask or pending_send_sz (see "Observers" in _layout.pxd); counts
    itself in data_waiters / space_watchers, so the ends signal it. Same returns as _wait.
    """
    cdef uint32_t *seq = &rg.ctl[W_SPACE_SEQ] if space else &rg.ctl[W_DATA_SEQ]
    cdef uint32_t *count = &rg.ctl[W_SPACE_WATCHERS] if space else &rg.ctl[W_DATA_WAITERS]
    if _watched(rg, space, 0):
        return ST_OK
    if deadline == 0:
        return ST_AGAIN
    return _sleep(rg, seq, count, _watched, space, 0, deadline, NULL)


# ---- writer ------------------------------------------------------------------------------

cdef int _w_load(hvring *rg, uint32_t *r_out) noexcept nogil:
    """Writer's view: flags, own index unchanged, peer's read_index valid (loaded once)."""
    cdef uint32_t w_shared, r
    if _flags(rg) != ST_OK:
        return ST_CORRUPT
    if hv_load_acquire(&rg.ctl[W_RESCINDED]) != 0:
        return ST_RESCINDED
    if not index_ok(rg.w_local, rg.size):
        return _corrupt(rg, CORRUPT_WRITE_INDEX, rg.w_local, rg.size)
    w_shared = hv_load_relaxed(&rg.ctl[W_WRITE_INDEX])
    if w_shared != rg.w_local:
        return _corrupt(rg, CORRUPT_INDEX_MOVED, w_shared, rg.w_local)
    r = hv_load_acquire(&rg.ctl[W_READ_INDEX])
    if not index_ok(r, rg.size):
        return _corrupt(rg, CORRUPT_READ_INDEX, r, rg.size)
    r_out[0] = r
    return ST_OK


cdef void _w_put_packet(hvring *rg, uint32_t w, const uint8_t *src, uint32_t n) noexcept nogil:
    """Write one in-band packet with an n-byte payload at data offset w (not published)."""
    cdef pkt_header h
    cdef uint32_t rp = roundup8(n)
    cdef uint64_t trailer = (<uint64_t>w) << 32
    cdef uint32_t off
    h.type = VM_PKT_DATA_INBAND
    h.offset8 = HEADER_SIZE // 8 - 1  # 2: payload right after the 16-byte descriptor
    h.len8 = <uint16_t>((HEADER_SIZE + rp) >> 3)
    h.flags = 0
    h.trans_id = 0
    h.pkt_type = PIPE_PKT_DATA
    h.data_size = n
    ring_put(rg, w, &h, HEADER_SIZE)
    off = ring_add(w, HEADER_SIZE, rg.size)
    if n:
        ring_put(rg, off, src, n)
    if rp != n:
        ring_zero(rg, ring_add(off, n, rg.size), rp - n)
    ring_put(rg, ring_add(off, rp, rg.size), &trailer, TRAILER_SIZE)


cdef void _w_publish(hvring *rg, uint32_t old_w, uint32_t new_w) noexcept nogil:
    """Publish write_index, then signal the reader per hv_signal_on_write."""
    hv_store_release(&rg.ctl[W_WRITE_INDEX], new_w)
    rg.w_local = new_w
    hv_fence()  # the store above must be visible before we look at the reader's words
    if (hv_load_seq(&rg.ctl[W_INTERRUPT_MASK]) != 0
            and hv_load_seq(&rg.ctl[W_DATA_WAITERS]) == 0):
        return  # reader is polling, and no observer sleeps
    if hv_load_seq(&rg.ctl[W_READ_INDEX]) != old_w:
        return  # ring was not empty before this packet: reader already knows
    rg.signals_sent += 1
    hv_fetch_add(&rg.ctl[W_DATA_SEQ], 1)
    if hv_load_seq(&rg.ctl[W_DATA_WAITERS]) != 0:
        rg.wakes_issued += 1
        hv_futex_wake(&rg.ctl[W_DATA_SEQ], INT_MAX)


cdef int ring_write(hvring *rg, const uint8_t *src, size_t n, int64_t deadline,
                    bint all_, size_t *done) noexcept nogil:
    """Write src[done:n] as packets of at most max_payload bytes.

    all_=0 (send): return as soon as at least one byte went in. all_=1 (sendall): until
    everything is written. `done` accumulates across calls (EINTR retries).
    """
    cdef uint32_t r, w, old_w, free, avail, p, need
    cdef size_t left
    cdef int st
    cdef size_t start = done[0]
    if rg.fin_sent:
        return ST_FIN_SENT
    while True:
        st = _w_load(rg, &r)
        if st != ST_OK:
            return st
        w = rg.w_local
        free = ring_free(w, r, rg.size)
        while done[0] < n and free > WRITE_RESERVE:
            avail = free - WRITE_RESERVE
            p = rg.max_payload
            if avail < p:
                p = avail
            left = n - done[0]
            if left < p:
                p = <uint32_t>left
            _w_put_packet(rg, w, src + done[0], p)
            old_w = w
            w = ring_add(w, packet_len(p), rg.size)
            _w_publish(rg, old_w, w)
            free -= packet_len(p)
            done[0] += p
            rg.bytes_written += p
            rg.packets_written += 1
            rg.total_written += p
            hv_store64_release(<uint64_t *>&rg.ctl[W_BYTES_WRITTEN], rg.total_written)
        if done[0] == n or (done[0] > start and not all_):
            return ST_OK
        left = n - done[0]
        p = rg.max_payload
        if left < p:
            p = <uint32_t>left
        need = packet_len(p) + FIN_PACKET_LEN + 8  # free > packet + FIN reserve
        st = _wait(rg, 1, need, deadline)
        if st != ST_OK:
            return st


cdef int ring_fin(hvring *rg, int64_t deadline) noexcept nogil:
    """Write the zero-length packet (FIN). Idempotent."""
    cdef uint32_t r, w
    cdef int st
    while not rg.fin_sent:
        st = _w_load(rg, &r)
        if st != ST_OK:
            return st
        w = rg.w_local
        if ring_free(w, r, rg.size) > FIN_PACKET_LEN:
            _w_put_packet(rg, w, NULL, 0)
            _w_publish(rg, w, ring_add(w, FIN_PACKET_LEN, rg.size))
            rg.fin_sent = 1
            rg.packets_written += 1
            return ST_OK
        st = _wait(rg, 1, FIN_PACKET_LEN + 8, deadline)
        if st != ST_OK:
            return st
    return ST_OK


cdef uint64_t ring_writable(hvring *rg, uint32_t r) noexcept nogil:
    """Payload bytes one write could take now without blocking (multi-packet)."""
    cdef uint32_t free = ring_free(rg.w_local, r, rg.size)
    cdef uint64_t total = 0
    cdef uint32_t p
    while free > WRITE_RESERVE:
        p = free - WRITE_RESERVE
        if p > rg.max_payload:
            p = rg.max_payload
        total += p
        free -= packet_len(p)
    return total


# ---- reader ------------------------------------------------------------------------------

cdef int _r_load(hvring *rg, uint32_t *w_out) noexcept nogil:
    """Reader's view: flags, own index unchanged, peer's write_index valid (loaded once)."""
    cdef uint32_t r_shared, w
    if _flags(rg) != ST_OK:
        return ST_CORRUPT
    if not index_ok(rg.r_local, rg.size):
        return _corrupt(rg, CORRUPT_READ_INDEX, rg.r_local, rg.size)
    r_shared = hv_load_relaxed(&rg.ctl[W_READ_INDEX])
    if r_shared != rg.r_local:
        return _corrupt(rg, CORRUPT_INDEX_MOVED, r_shared, rg.r_local)
    w = hv_load_acquire(&rg.ctl[W_WRITE_INDEX])
    if not index_ok(w, rg.size):
        return _corrupt(rg, CORRUPT_WRITE_INDEX, w, rg.size)
    w_out[0] = w
    return ST_OK


cdef int _r_parse(hvring *rg, uint32_t r, uint32_t w, uint32_t *ds_out,
                  uint32_t *total_out) noexcept nogil:
    """Validate the packet at r against the used bytes; never trust a length before this."""
    cdef pkt_header h
    cdef uint64_t trailer
    cdef uint32_t used = ring_used(w, r, rg.size)
    cdef uint32_t body, total
    if used < FIN_PACKET_LEN:
        return _corrupt(rg, CORRUPT_SHORT_PACKET, used, r)
    ring_get(rg, r, &h, HEADER_SIZE)
    if h.type != VM_PKT_DATA_INBAND:
        return _corrupt(rg, CORRUPT_DESC_TYPE, h.type, r)
    if h.offset8 != 2:
        return _corrupt(rg, CORRUPT_OFFSET8, h.offset8, r)
    body = (<uint32_t>h.len8) * 8
    total = body + TRAILER_SIZE
    if body < HEADER_SIZE or total > used:
        return _corrupt(rg, CORRUPT_LEN8, total, used)
    if h.pkt_type != PIPE_PKT_DATA:
        return _corrupt(rg, CORRUPT_PIPE_TYPE, h.pkt_type, r)
    if h.data_size > MAX_PAYLOAD or HEADER_SIZE + roundup8(h.data_size) != body:
        return _corrupt(rg, CORRUPT_DATA_SIZE, h.data_size, body)
    ring_get(rg, ring_add(r, body, rg.size), &trailer, TRAILER_SIZE)
    if trailer != (<uint64_t>r) << 32:
        return _corrupt(rg, CORRUPT_TRAILER, trailer, r)
    ds_out[0] = h.data_size
    total_out[0] = total
    return ST_OK


cdef void _r_publish(hvring *rg, uint32_t r_old, uint32_t r_new) noexcept nogil:
    """Publish read_index for a whole batch, then signal per hv_pkt_iter_close."""
    cdef uint32_t pending, watchers, w, before, after
    hv_store_release(&rg.ctl[W_READ_INDEX], r_new)
    rg.r_local = r_new
    hv_fence()  # read_index store before the pending_send_sz load (pairs with _wait)
    pending = hv_load_seq(&rg.ctl[W_PENDING_SEND_SZ]) & ~(<uint32_t>7)
    if (hv_load_relaxed(&rg.ctl[W_FEATURE_BITS]) & FEAT_PENDING_SEND_SZ) == 0:
        pending = 0
    watchers = hv_load_seq(&rg.ctl[W_SPACE_WATCHERS])
    if pending == 0 and watchers == 0:
        return
    w = hv_load_acquire(&rg.ctl[W_WRITE_INDEX])  # re-read: the writer's final index
    if not index_ok(w, rg.size):
        return  # reported by the next operation
    before = ring_free(w, r_old, rg.size)
    after = ring_free(w, r_new, rg.size)
    # Signal a threshold crossed: the writer's (it was blocked, now it is not) or, with
    # observers asleep, the "writable at all" one they wait for.
    if not ((pending != 0 and before < pending <= after)
            or (watchers != 0 and before < WATCH_SPACE <= after)):
        return
    rg.signals_sent += 1
    hv_fetch_add(&rg.ctl[W_SPACE_SEQ], 1)
    if watchers != 0 or hv_load_seq(&rg.ctl[W_SPACE_WAITERS]) != 0:
        rg.wakes_issued += 1
        hv_futex_wake(&rg.ctl[W_SPACE_SEQ], INT_MAX)


cdef int ring_read(hvring *rg, uint8_t *dst, size_t n, int64_t deadline,
                   size_t *done) noexcept nogil:
    """Copy up to n payload bytes (several packets, partial packets) into dst.

    done == 0 with ST_OK means EOF (FIN consumed, or rescinded and drained).
    A FIN after data ends the batch; the next call reports EOF.
    """
    cdef uint32_t w, r, r0, take, rescinded
    cdef uint32_t ds = 0
    cdef uint32_t total = 0
    cdef int st
    done[0] = 0
    if n == 0:
        return ST_OK
    while True:
        if rg.eof:
            return ST_OK
        # The rescind flag is loaded before the write index: a writer publishes its last
        # packets before its partition closes and the host rescinds, so a rescind seen here
        # orders those packets before the index load. The other order could load an empty
        # ring, then a rescind set after the packets, and drop them as EOF.
        rescinded = hv_load_acquire(&rg.ctl[W_RESCINDED])
        st = _r_load(rg, &w)
        if st != ST_OK:
            return st
        r = rg.r_local
        if w != r:
            break
        if rescinded != 0:
            return ST_OK  # drained after rescind: EOF
        st = _wait(rg, 0, 0, deadline)
        if st != ST_OK:
            return st
    r0 = r
    st = ST_OK
    while done[0] < n and r != w:
        st = _r_parse(rg, r, w, &ds, &total)
        if st != ST_OK:
            break
        if ds == 0:  # FIN
            if done[0] > 0:
                break  # deliver the data first; EOF on the next call
            r = ring_add(r, total, rg.size)
            rg.eof = 1
            rg.packets_read += 1
            break
        if rg.partial >= ds:
            st = _corrupt(rg, CORRUPT_PARTIAL, rg.partial, ds)
            break
        take = ds - rg.partial
        if take > n - done[0]:
            take = <uint32_t>(n - done[0])
        ring_get(rg, ring_add(r, HEADER_SIZE + rg.partial, rg.size), dst + done[0], take)
        rg.partial += take
        done[0] += take
        if rg.partial == ds:
            r = ring_add(r, total, rg.size)
            rg.partial = 0
            rg.packets_read += 1
    rg.bytes_read += done[0]
    if r != r0:
        _r_publish(rg, r0, r)
    if st != ST_OK and done[0] == 0:
        return st
    return ST_OK


# ------------------------------------------------------------------------------------------
# Python edge
# ------------------------------------------------------------------------------------------

cdef inline int64_t _deadline(object timeout) except? -2:
    """None -> -1 (forever), 0 -> 0 (non-blocking), t > 0 -> absolute monotonic ns."""
    cdef double t
    if timeout is None:
        return -1
    t = timeout
    if t < 0:
        raise ValueError("timeout must be non-negative or None")
    if t == 0:
        return 0
    return hv_now_ns() + <int64_t>(t * 1e9) + 1


cdef class Ring:
    """One VMBus-style ring over a writable buffer (bytearray, mmap, memoryview, ...).

    ``Ring(buffer, *, initialize=False, max_payload=MAX_PAYLOAD, spin_ns=None)``

    The buffer is a 4096-byte control page followed by whole 4 KiB data pages (at least
    one). ``initialize=True`` resets the control page (the creator does this once);
    otherwise the identity words must match. One process writes, one reads (SPSC); the
    same object may do both in tests. Timeouts: ``None`` blocks, ``0`` never blocks
    (``BlockingIOError``), ``t > 0`` raises ``TimeoutError`` after ``t`` seconds.

    ``readable()`` and ``writable()`` check this end's own index like a read or a write does
    (and mark the ring corrupt if the shared copy moved), so only the thread that reads
    (writes) may call them: from another, a publish seen half done looks like corruption.
    Another thread (a readiness watcher) probes and waits with ``watch_readable`` /
    ``watch_writable``, which only look at shared words and leave the ends' signalling words
    alone.
    """

    cdef hvring rg
    cdef Py_buffer view
    cdef bint has_view
    cdef int busy

    def __cinit__(self):
        memset(&self.rg, 0, sizeof(hvring))
        self.has_view = False
        self.busy = 0

    def __init__(self, buffer, *, bint initialize=False, int max_payload=MAX_PAYLOAD,
                 spin_ns=None):
        cdef Py_ssize_t length
        cdef uint32_t size
        cdef uint32_t *ctl
        cdef int64_t spin
        if self.has_view:
            raise RuntimeError("Ring.__init__ called twice")
        if not 1 <= max_payload <= MAX_PAYLOAD:
            raise ValueError(f"max_payload must be in 1..{MAX_PAYLOAD}, not {max_payload}")
        spin = _DEFAULT_SPIN_NS if spin_ns is None else spin_ns
        if spin < 0:
            raise ValueError("spin_ns must be >= 0")
        PyObject_GetBuffer(buffer, &self.view, PyBUF_WRITABLE)
        self.has_view = True
        try:
            length = self.view.len
            if length % PAGE_SIZE or length < MIN_RING_PAGES * PAGE_SIZE or length > (1 << 30):
                raise ValueError(
                    f"ring buffer must be whole 4 KiB pages, at least {MIN_RING_PAGES} pages "
                    f"and at most 1 GiB; got {length} bytes")
            if (<uintptr_t>self.view.buf) % 8:
                raise ValueError("ring buffer must be 8-byte aligned")
            size = <uint32_t>(length - CONTROL_PAGE_SIZE)
            ctl = <uint32_t *>self.view.buf
            if initialize:
                memset(ctl, 0, CONTROL_PAGE_SIZE)
                ctl[W_FEATURE_BITS] = FEAT_PENDING_SEND_SZ
                ctl[W_MAGIC] = RING_MAGIC
                ctl[W_VERSION] = RING_VERSION
                ctl[W_DATA_SIZE] = size
                hv_fence()
            elif (hv_load_acquire(&ctl[W_MAGIC]) != RING_MAGIC
                  or hv_load_acquire(&ctl[W_VERSION]) != RING_VERSION
                  or hv_load_acquire(&ctl[W_DATA_SIZE]) != size):
                raise _status_error(ST_CORRUPT, CORRUPT_IDENTITY, ctl[W_MAGIC], ctl[W_DATA_SIZE])
            self.rg.ctl = ctl
            self.rg.data = <uint8_t *>self.view.buf + CONTROL_PAGE_SIZE
            self.rg.size = size
            self.rg.max_payload = min(<uint32_t>max_payload, (size - WRITE_RESERVE) & ~(<uint32_t>7))
            self.rg.w_local = hv_load_acquire(&ctl[W_WRITE_INDEX])
            self.rg.r_local = hv_load_acquire(&ctl[W_READ_INDEX])
            self.rg.total_written = hv_load64_acquire(<uint64_t *>&ctl[W_BYTES_WRITTEN])
            self.rg.spin_max_ns = spin
            self.rg.spin_ns = spin
        except BaseException:
            PyBuffer_Release(&self.view)
            self.has_view = False
            raise

    def __dealloc__(self):
        if self.has_view:
            PyBuffer_Release(&self.view)
            self.has_view = False

    # -- the one status -> exception conversion -------------------------------------------

    cdef int _fail(self, int st, str op) except -1:
        raise _status_error(st, self.rg.corrupt_reason, self.rg.corrupt_a, self.rg.corrupt_b,
                            op=op)

    cdef inline int _check_open(self) except -1:
        if not self.has_view:
            return self._fail(ST_CLOSED, "")
        return 0

    # -- writing ---------------------------------------------------------------------------

    cdef size_t _write(self, data, object timeout, bint all_) except? 0:
        cdef Py_buffer src
        cdef int st = ST_OK
        cdef size_t done = 0
        cdef int64_t deadline = _deadline(timeout)
        self._check_open()
        try:
            PyObject_GetBuffer(data, &src, PyBUF_SIMPLE)
        except BufferError:
            # non-contiguous exporter: the only case with an intermediate copy
            data = memoryview(data).tobytes()
            PyObject_GetBuffer(data, &src, PyBUF_SIMPLE)
        self.busy += 1
        try:
            if src.len == 0:
                if self.rg.fin_sent:
                    self._fail(ST_FIN_SENT, "write")
                return 0
            while True:
                with nogil:
                    st = ring_write(&self.rg, <const uint8_t *>src.buf, <size_t>src.len,
                                    deadline, all_, &done)
                if st == ST_INTR:
                    PyErr_CheckSignals()
                    if done > 0 and not all_:
                        return done
                    continue
                break
        finally:
            self.busy -= 1
            PyBuffer_Release(&src)
        if st != ST_OK:
            if done > 0 and not all_ and st != ST_CORRUPT:
                return done
            self._fail(st, "write")
        return done

    def write(self, data, timeout=None):
        """Write some of ``data`` (like ``socket.send``): block until at least one byte
        fits, write as much as fits, return the count. No copy of ``data`` is made."""
        return self._write(data, timeout, False)

    def write_all(self, data, timeout=None):
        """Write all of ``data`` (like ``socket.sendall``); ``timeout`` bounds the whole call."""
        self._write(data, timeout, True)

    def fin(self, timeout=None):
        """Write the FIN (zero-length packet). Later writes raise BrokenPipeError."""
        cdef int st
        cdef int64_t deadline = _deadline(timeout)
        self._check_open()
        self.busy += 1
        try:
            while True:
                with nogil:
                    st = ring_fin(&self.rg, deadline)
                if st == ST_INTR:
                    PyErr_CheckSignals()
                    continue
                break
        finally:
            self.busy -= 1
        if st != ST_OK:
            self._fail(st, "fin")

    # -- reading ---------------------------------------------------------------------------

    def read_into(self, buffer, Py_ssize_t nbytes=0, timeout=None):
        """Read up to ``nbytes`` (default: ``len(buffer)``) into ``buffer``; return the count.
        0 means EOF (FIN received, or rescinded and drained)."""
        cdef Py_buffer dst
        cdef int st = ST_OK
        cdef size_t done = 0
        cdef size_t n
        cdef int64_t deadline = _deadline(timeout)
        self._check_open()
        if nbytes < 0:
            raise ValueError("negative buffersize in read_into")
        PyObject_GetBuffer(buffer, &dst, PyBUF_WRITABLE)
        self.busy += 1
        try:
            n = <size_t>dst.len
            if nbytes:
                if <size_t>nbytes > n:
                    raise ValueError("buffer too small for requested bytes")
                n = <size_t>nbytes
            while True:
                with nogil:
                    st = ring_read(&self.rg, <uint8_t *>dst.buf, n, deadline, &done)
                if st == ST_INTR:
                    PyErr_CheckSignals()
                    continue
                break
        finally:
            self.busy -= 1
            PyBuffer_Release(&dst)
        if st != ST_OK:
            self._fail(st, "read")
        return done

    def read(self, Py_ssize_t n=65536, timeout=None):
        """Read up to ``n`` bytes and return them (b"" at EOF)."""
        if n < 0:
            raise ValueError("n must be >= 0")
        buf = bytearray(n)
        k = self.read_into(buf, 0, timeout)
        del buf[k:]
        return bytes(buf)

    # -- waiting and state -----------------------------------------------------------------

    def wait_readable(self, timeout=None):
        """Wait until a read would not block (data, EOF, rescind, corruption).
        Returns False on timeout."""
        cdef int64_t deadline = _deadline(timeout)
        self._check_open()
        if self.rg.eof:
            return True
        return self._block(False, False, 0, deadline) == ST_OK

    def wait_writable(self, Py_ssize_t nbytes=1, timeout=None):
        """Wait until a write of ``min(nbytes, max_payload)`` bytes would not block (or the
        ring is rescinded/corrupt). Returns False on timeout."""
        cdef uint32_t p
        cdef int64_t deadline = _deadline(timeout)
        self._check_open()
        p = self.rg.max_payload if nbytes > self.rg.max_payload else <uint32_t>max(nbytes, 1)
        return self._block(False, True, packet_len(p) + FIN_PACKET_LEN + 8, deadline) == ST_OK

    def watch_readable(self, timeout=None):
        """``wait_readable`` for an observer: a thread that is not this ring's reader (a
        readiness watcher). It leaves the reader's signalling words alone, so it may run
        while the reader itself is blocked. Returns False on timeout."""
        cdef int64_t deadline = _deadline(timeout)
        self._check_open()
        return self._block(True, False, 0, deadline) == ST_OK

    def watch_writable(self, timeout=None):
        """``wait_writable(1)`` for an observer (see ``watch_readable``)."""
        cdef int64_t deadline = _deadline(timeout)
        self._check_open()
        return self._block(True, True, WATCH_SPACE, deadline) == ST_OK

    cdef int _block(self, bint observer, bint space, uint32_t need, int64_t deadline) except? -1:
        """Run a wait (an observer's with ``observer``) without the GIL, busy meanwhile so
        close() refuses; signal handlers run between tries. Returns its ST_* status."""
        cdef int st
        self.busy += 1
        try:
            while True:
                with nogil:
                    if observer:
                        st = _watch(&self.rg, space, deadline)
                    else:
                        st = _wait(&self.rg, space, need, deadline)
                if st != ST_INTR:
                    return st
                PyErr_CheckSignals()
        finally:
            self.busy -= 1

    def readable(self):
        """Ring bytes waiting to be read (framing included); 0 = a read would block
        (unless ``at_eof`` or ``is_rescinded``)."""
        cdef uint32_t w
        cdef int st
        self._check_open()
        st = _r_load(&self.rg, &w)
        if st != ST_OK:
            self._fail(st, "readable")
        return ring_used(w, self.rg.r_local, self.rg.size)

    def writable(self):
        """Payload bytes a write could take now without blocking (0 after FIN/rescind)."""
        cdef uint32_t r
        cdef int st
        self._check_open()
        if self.rg.fin_sent:
            return 0
        st = _w_load(&self.rg, &r)
        if st == ST_RESCINDED:
            return 0
        if st != ST_OK:
            self._fail(st, "writable")
        return ring_writable(&self.rg, r)

    def rescind(self):
        """Mark the ring rescinded and wake every waiter (both directions' sleepers)."""
        self._check_open()
        hv_store_seq(&self.rg.ctl[W_RESCINDED], 1)
        _wake_all(self.rg.ctl)

    def close(self):
        """Release the buffer. Idempotent. Refused while a call is blocked in this ring."""
        if self.busy:
            raise OSError(16, "ring is in use by a blocked call; rescind it first")  # EBUSY
        if self.has_view:
            PyBuffer_Release(&self.view)
            self.has_view = False
            self.rg.ctl = NULL
            self.rg.data = NULL

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    @property
    def closed(self):
        return not self.has_view

    @property
    def is_rescinded(self):
        self._check_open()
        return hv_load_acquire(&self.rg.ctl[W_RESCINDED]) != 0

    @property
    def at_eof(self):
        return bool(self.rg.eof)

    @property
    def fin_sent(self):
        return bool(self.rg.fin_sent)

    @property
    def data_size(self):
        return self.rg.size

    @property
    def max_payload(self):
        return self.rg.max_payload

    @property
    def partial(self):
        """Bytes of the head packet's payload already consumed by this reader."""
        return self.rg.partial

    # raw control words, for diagnostics and tests
    cdef uint32_t _word(self, int index) except? 0:
        self._check_open()
        return hv_load_acquire(&self.rg.ctl[index])

    @property
    def write_index(self):
        return self._word(W_WRITE_INDEX)

    @property
    def read_index(self):
        return self._word(W_READ_INDEX)

    @property
    def interrupt_mask(self):
        return self._word(W_INTERRUPT_MASK)

    @property
    def pending_send_sz(self):
        return self._word(W_PENDING_SEND_SZ)

    @property
    def feature_bits(self):
        return self._word(W_FEATURE_BITS)

    @property
    def bytes_written_total(self):
        """The control page's bytes_written: payload bytes every writer of this ring wrote
        into it since it was initialised. Written by the writer, so untrusted: report it,
        never decide with it."""
        self._check_open()
        return hv_load64_acquire(<uint64_t *>&self.rg.ctl[W_BYTES_WRITTEN])

    def stats(self):
        """Counters of this end (not shared): bytes/packets moved, signals, sleeps."""
        return {
            "bytes_written": self.rg.bytes_written,
            "bytes_read": self.rg.bytes_read,
            "packets_written": self.rg.packets_written,
            "packets_read": self.rg.packets_read,
            "signals_sent": self.rg.signals_sent,
            "wakes_issued": self.rg.wakes_issued,
            "sleeps": self.rg.sleeps,
            "spin_hits": self.rg.spin_hits,
        }

    def __repr__(self):
        if not self.has_view:
            return "<ring._ring.Ring closed>"
        return (f"<ring._ring.Ring data_size={self.rg.size} "
                f"w={self.write_index} r={self.read_index}>")


# ------------------------------------------------------------------------------------------
# Wait sets: one thread asleep on many rings (see "Wait sets" in _layout.pxd)
# ------------------------------------------------------------------------------------------

cdef inline uint32_t *_armed_seq(hvring *rg, bint space) noexcept nogil:
    return &rg.ctl[W_SPACE_SEQ] if space else &rg.ctl[W_DATA_SEQ]


cdef inline bint _armed_ready(hvring *rg, bint space, uint32_t need) noexcept nogil:
    # data: the observer's condition (shared words only); space: the writer's own (the set
    # is its delegate, and the writer is not running while the entry is armed).
    return _cond_space(rg, need) if space else _watched(rg, False, 0)


@cython.no_gc_clear  # __dealloc__ disarms through the rings it still holds
cdef class WaitSet:
    """Up to ``WAITSET_CAPACITY`` (127) ring waits that one thread sleeps on at once.

    ``add(ring, space, need)`` arms a wait and returns its slot: for data (``space`` false:
    the ring holds something to read, or is rescinded or corrupt) as an observer; for room
    (``space``: ``need`` free bytes, or rescinded/corrupt) as the delegate of the ring's
    writer, which must make no ring call until ``remove(slot)`` has disarmed it (see "Wait
    sets" in ``ring/_layout.pxd``). ``wait(timeout)`` returns the slots whose condition holds,
    sleeping (without the GIL, never spinning) until one does, ``wake()`` is called, or the
    timeout passes (then possibly ``[]``); ready entries stay armed until removed. An armed
    ring is busy: its ``close()`` refuses (EBUSY) until the entry is removed.

    ``add``, ``remove``, ``wait`` and ``close``: the set's owner thread only. ``wake``: any.
    """

    cdef hvring *rg[WAITSET_CAPACITY]
    cdef uint32_t need[WAITSET_CAPACITY]
    cdef bint space[WAITSET_CAPACITY]
    # Built by each round: the armed entries' sequence words, then the wake-up word.
    cdef hv_waitv wv[HV_WAITV_MAX]
    cdef uint32_t wake_word  # bumped by wake(); a private futex (this object never moves)
    cdef uint32_t seen_wake  # wake_word as the last wait() saw it
    cdef list rings  # slot -> the armed Ring (kept alive, and busy, while armed) or None
    cdef int count

    def __cinit__(self):
        memset(self.rg, 0, sizeof(self.rg))
        self.rings = [None] * WAITSET_CAPACITY
        self.count = 0
        self.wake_word = 0
        self.seen_wake = 0

    def __dealloc__(self):
        self._disarm_all()

    cdef void _disarm(self, int slot) noexcept:
        cdef hvring *rg = self.rg[slot]
        cdef Ring ring = self.rings[slot]
        if self.space[slot]:
            hv_store_seq(&rg.ctl[W_PENDING_SEND_SZ], 0)
            hv_fetch_sub(&rg.ctl[W_SPACE_WAITERS], 1)
        else:
            hv_fetch_sub(&rg.ctl[W_DATA_WAITERS], 1)
        ring.busy -= 1
        self.rg[slot] = NULL
        self.rings[slot] = None
        self.count -= 1

    cdef void _disarm_all(self) noexcept:
        cdef int i
        if self.rings is None:
            return
        for i in range(WAITSET_CAPACITY):
            if self.rg[i] != NULL:
                self._disarm(i)

    def add(self, Ring ring not None, bint space, uint32_t need=0):
        """Arm a wait on ``ring``: for data, or (``space``) for ``need`` free ring bytes
        (1 ..data size). Returns the slot. ``OverflowError`` when the set is full."""
        cdef int i
        cdef hvring *rg = &ring.rg
        ring._check_open()
        if space and not 0 < need <= rg.size:
            raise ValueError(f"need must be 1..{rg.size} bytes, not {need}")
        if self.count >= WAITSET_CAPACITY:
            raise OverflowError(f"a wait set holds at most {WAITSET_CAPACITY} waits")
        i = 0
        while self.rg[i] != NULL:
            i += 1
        if space:
            # The writer's wait, phase 2 (_wait / _sleep): the threshold first, then counted.
            hv_store_seq(&rg.ctl[W_PENDING_SEND_SZ], need)
            hv_fetch_add(&rg.ctl[W_SPACE_WAITERS], 1)
        else:
            hv_fetch_add(&rg.ctl[W_DATA_WAITERS], 1)  # an observer (_watch)
        ring.busy += 1
        self.rg[i] = rg
        self.space[i] = space
        self.need[i] = need
        self.rings[i] = ring
        self.count += 1
        return i

    def remove(self, int slot):
        """Disarm the wait in ``slot`` (its ring is no longer busy on this set's account)."""
        if not 0 <= slot < WAITSET_CAPACITY or self.rg[slot] == NULL:
            raise ValueError(f"no wait in slot {slot}")
        self._disarm(slot)

    def close(self):
        """Disarm every wait. Idempotent."""
        self._disarm_all()

    def wake(self):
        """Make the owner's current (or next) ``wait`` return. Any thread."""
        hv_fetch_add(&self.wake_word, 1)
        hv_futex_wake_private(&self.wake_word, INT_MAX)

    def __len__(self):
        return self.count

    cdef int _round(self, int64_t deadline, int *ready, int *nready) noexcept nogil:
        """Collect the ready slots into ``ready``; sleep on every armed word and the wake-up
        word while none is, until woken, the deadline, or a signal. 0, or EINTR."""
        cdef int i, k, rc
        cdef uint32_t w
        cdef uint32_t *seq
        while True:
            k = 0
            nready[0] = 0
            w = hv_load_seq(&self.wake_word)
            for i in range(WAITSET_CAPACITY):
                if self.rg[i] == NULL:
                    continue
                # The word first, then the condition: a signal in between changes the word,
                # so the sleep below returns at once instead of losing it.
                seq = _armed_seq(self.rg[i], self.space[i])
                self.wv[k].val = hv_load_seq(seq)
                self.wv[k].uaddr = <uintptr_t>seq
                self.wv[k].flags = HV_FUTEX2_SIZE_U32  # shared: the peer process wakes it
                self.wv[k].reserved = 0
                k += 1
                if _armed_ready(self.rg[i], self.space[i], self.need[i]):
                    ready[nready[0]] = i
                    nready[0] += 1
            if w != self.seen_wake:
                self.seen_wake = w
                return 0
            if nready[0] or deadline == 0 or (deadline > 0 and hv_now_ns() >= deadline):
                return 0
            self.wv[k].val = w
            self.wv[k].uaddr = <uintptr_t>&self.wake_word
            self.wv[k].flags = HV_FUTEX2_SIZE_U32 | HV_FUTEX2_PRIVATE
            self.wv[k].reserved = 0
            rc = hv_futex_waitv(self.wv, k + 1, deadline)
            if rc == EINTR:
                return EINTR
            if rc == ENOSYS:
                # No futex_waitv (a kernel before 5.16, or a seccomp filter): poll, 1 ms.
                hv_futex_wait(&self.wake_word, w, 1000000)
            # 0 (woken), EAGAIN (a word moved already), ETIMEDOUT: look again

    def wait(self, timeout=None):
        """The slots whose wait is ready (``[]`` after ``wake()`` or on timeout): sleeps
        until one is, without the GIL. ``timeout``: None forever, 0 never sleeps."""
        cdef int64_t deadline = _deadline(timeout)
        cdef int ready[WAITSET_CAPACITY]
        cdef int nready = 0
        cdef int rc
        while True:
            with nogil:
                rc = self._round(deadline, ready, &nready)
            if rc != EINTR:
                break
            PyErr_CheckSignals()
        return [ready[i] for i in range(nready)]


# ------------------------------------------------------------------------------------------
# Word helpers for ring.shm (channel header handshake). offset: byte offset, multiple of 4.
# ------------------------------------------------------------------------------------------

cdef uint32_t *_word_ptr(Py_buffer *view, Py_ssize_t offset) except NULL:
    if offset < 0 or offset % 4 or offset + 4 > view.len:
        raise ValueError(f"bad word offset {offset}")
    return <uint32_t *>(<uint8_t *>view.buf + offset)


def atomic_load(buffer, Py_ssize_t offset):
    """Acquire-load the u32 at ``offset`` of ``buffer``."""
    cdef Py_buffer v
    PyObject_GetBuffer(buffer, &v, PyBUF_WRITABLE)
    try:
        return hv_load_acquire(_word_ptr(&v, offset))
    finally:
        PyBuffer_Release(&v)


def atomic_store(buffer, Py_ssize_t offset, uint32_t value):
    """Sequentially consistent store of a u32."""
    cdef Py_buffer v
    PyObject_GetBuffer(buffer, &v, PyBUF_WRITABLE)
    try:
        hv_store_seq(_word_ptr(&v, offset), value)
    finally:
        PyBuffer_Release(&v)


def atomic_fetch_or(buffer, Py_ssize_t offset, uint32_t bits):
    """Atomically OR ``bits`` into the u32 at ``offset``; return the previous value."""
    cdef Py_buffer v
    PyObject_GetBuffer(buffer, &v, PyBUF_WRITABLE)
    try:
        return hv_fetch_or(_word_ptr(&v, offset), bits)
    finally:
        PyBuffer_Release(&v)


def futex_wait(buffer, Py_ssize_t offset, uint32_t expected, timeout=None):
    """Sleep while the u32 at ``offset`` equals ``expected`` (shared futex).
    Returns False on timeout, True otherwise (woken, changed, or spurious)."""
    cdef Py_buffer v
    cdef uint32_t *p
    cdef int rc
    cdef int64_t deadline = _deadline(timeout)
    cdef int64_t remaining
    PyObject_GetBuffer(buffer, &v, PyBUF_WRITABLE)
    try:
        p = _word_ptr(&v, offset)
        while True:
            remaining = -1
            if deadline == 0:
                return hv_load_acquire(p) != expected
            if deadline > 0:
                remaining = deadline - hv_now_ns()
                if remaining <= 0:
                    return False
            with nogil:
                rc = hv_futex_wait(p, expected, remaining)
            if rc == EINTR:
                PyErr_CheckSignals()
                continue
            return rc != ETIMEDOUT
    finally:
        PyBuffer_Release(&v)


def futex_wake(buffer, Py_ssize_t offset, int count=INT_MAX):
    """Wake up to ``count`` sleepers on the u32 at ``offset``; return how many woke."""
    cdef Py_buffer v
    PyObject_GetBuffer(buffer, &v, PyBUF_WRITABLE)
    try:
        return hv_futex_wake(_word_ptr(&v, offset), count)
    finally:
        PyBuffer_Release(&v)
