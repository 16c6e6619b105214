/*
 * Small C helpers for ring/_ring.pyx: atomics, CPU relax, monotonic clock and futex.
 *
 * Everything here is `static inline`, never allocates and never touches Python.
 *
 * Memory-ordering vocabulary used by the ring (see ring/_layout.pxd for the protocol):
 *   - an index is *published* with a release store, so the packet bytes written before it
 *     are visible to whoever *acquires* the index;
 *   - the two "Dekker" hand-shakes (writer: publish write_index, then read interrupt_mask;
 *     reader: clear interrupt_mask, then read write_index; and the same shape for
 *     pending_send_sz/read_index) need a full fence between the store and the load, which
 *     is what hv_fence() is. On x86 that is an mfence (or a locked instruction); on arm64 dmb ish.
 *
 * The futex calls are deliberately *not* FUTEX_PRIVATE: the words live in a MAP_SHARED file
 * mapping under /dev/shm and the waker is another process, possibly in another container
 * that shares the IPC namespace; the kernel keys shared futexes by (inode, offset).
 */
#ifndef HVSOCK_RING_HVRING_H
#define HVSOCK_RING_HVRING_H

#include <errno.h>
#include <sched.h>
#include <limits.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#define HV_HAVE_FUTEX 1
#else
#define HV_HAVE_FUTEX 0
#endif

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the VMBus ring layout is little-endian; this build assumes a little-endian CPU"
#endif

static inline uint32_t hv_load_relaxed(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline uint32_t hv_load_acquire(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint32_t hv_load_seq(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
static inline void hv_store_relaxed(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline void hv_store_release(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void hv_store_seq(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
static inline uint32_t hv_fetch_add(uint32_t *p, uint32_t v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static inline uint32_t hv_fetch_sub(uint32_t *p, uint32_t v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }
static inline uint32_t hv_fetch_or(uint32_t *p, uint32_t v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
static inline uint64_t hv_load64_acquire(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void hv_store64_release(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void hv_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

/* Polite busy-wait hint: lets the sibling hyper-thread run and saves power while spinning. */
static inline void hv_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#else
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
#endif
}

/* Give the CPU to another runnable thread on it, if any (cheap when there is none). */
static inline void hv_yield(void) { sched_yield(); }

/* CLOCK_MONOTONIC in nanoseconds (vDSO, no syscall); the same clock as time.monotonic(). */
static inline int64_t hv_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + (int64_t)ts.tv_nsec;
}

/*
 * Sleep while *addr == expected, at most timeout_ns (< 0: no limit).
 * Returns 0 when woken (or spuriously), EAGAIN when *addr != expected already,
 * ETIMEDOUT, or EINTR when a signal arrived (the caller returns to Python so that
 * signal handlers run, then retries: PEP 475 style).
 */
static inline int hv_futex_wait(uint32_t *addr, uint32_t expected, int64_t timeout_ns)
{
#if HV_HAVE_FUTEX
    struct timespec ts, *tsp = NULL;
    if (timeout_ns >= 0) {
        ts.tv_sec = (time_t)(timeout_ns / 1000000000LL);
        ts.tv_nsec = (long)(timeout_ns % 1000000000LL);
        tsp = &ts;
    }
    long rc = syscall(SYS_futex, addr, FUTEX_WAIT, expected, tsp, NULL, 0);
    if (rc == 0)
        return 0;
    return errno;
#else
    /* No futex: a short sleep; callers re-check their condition in a loop. */
    struct timespec ts = {0, 200000};
    (void)addr; (void)expected; (void)timeout_ns;
    nanosleep(&ts, NULL);
    return 0;
#endif
}

/*
 * Vectorised wait (futex_waitv(2), Linux 5.16+): sleep until one of the n words (at most
 * HV_WAITV_MAX) no longer holds its expected value or is woken, at most until the absolute
 * CLOCK_MONOTONIC deadline_ns (< 0: no limit). ``shared`` says per word whether it lives in
 * shared memory (a ring's sequence word: keyed by inode and offset, woken by another process)
 * or in this process only (FUTEX2_PRIVATE). Returns 0 when woken (or spuriously), EAGAIN when a
 * word differs already, ETIMEDOUT, EINTR; ENOSYS where there is no futex_waitv (the caller
 * then polls).
 */
#define HV_WAITV_MAX 128

struct hv_waitv {            /* the kernel's struct futex_waitv, spelled out for old headers */
    uint64_t val;
    uint64_t uaddr;
    uint32_t flags;
    uint32_t reserved;
};

#define HV_FUTEX2_SIZE_U32 0x02
#define HV_FUTEX2_PRIVATE 128

static inline int hv_futex_waitv(struct hv_waitv *waiters, unsigned int n, int64_t deadline_ns)
{
#if HV_HAVE_FUTEX
#ifndef SYS_futex_waitv
#define SYS_futex_waitv 449  /* the same number on every architecture (a new-style syscall) */
#endif
    struct timespec ts, *tsp = NULL;
    if (deadline_ns >= 0) {
        ts.tv_sec = (time_t)(deadline_ns / 1000000000LL);
        ts.tv_nsec = (long)(deadline_ns % 1000000000LL);
        tsp = &ts;
    }
    long rc = syscall(SYS_futex_waitv, waiters, n, 0, tsp, CLOCK_MONOTONIC);
    if (rc >= 0)
        return 0;
    return errno;
#else
    (void)waiters; (void)n; (void)deadline_ns;
    return ENOSYS;
#endif
}

/* Wake up to n waiters sleeping on addr; returns the number woken (or -errno). */
static inline int hv_futex_wake(uint32_t *addr, int n)
{
#if HV_HAVE_FUTEX
    long rc = syscall(SYS_futex, addr, FUTEX_WAKE, n, NULL, NULL, 0);
    return rc < 0 ? -errno : (int)rc;
#else
    (void)addr; (void)n;
    return 0;
#endif
}

/* hv_futex_wake for a word private to this process (a FUTEX2_PRIVATE waiter's). */
static inline int hv_futex_wake_private(uint32_t *addr, int n)
{
#if HV_HAVE_FUTEX
    long rc = syscall(SYS_futex, addr, FUTEX_WAKE_PRIVATE, n, NULL, NULL, 0);
    return rc < 0 ? -errno : (int)rc;
#else
    (void)addr; (void)n;
    return 0;
#endif
}

#endif /* HVSOCK_RING_HVRING_H */
