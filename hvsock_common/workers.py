"""Daemon worker threads reused across jobs (the host's relay pumps, a client's relay loops).

``threading.Thread.start()`` does not return until the new thread has run, which under GIL
contention costs the caller the better part of 100 µs: on the host's event loop, or on a
client's attach-stream reader, for every relayed channel end. A pool hands a job to an idle
worker instead (a queue put) and starts a thread only when none is idle. A job may block for
as long as it likes (a relay pump lives as long as its channel): it holds its worker that long.

A worker that finds no job for ``idle_timeout`` seconds exits, so the thread count comes back
down after a burst (thousands of channels opened and closed, a storm of cancelled streams). A
pool that has been idle that long serves less than a job per ``idle_timeout``, where the cost of
starting a thread again no longer matters.

Invariant: ``_idle`` never exceeds the number of workers blocked in, or on their way to,
``_jobs.get()``, so every job put behind a decrement of ``_idle`` is taken by one of them. A
worker whose wait timed out leaves only by taking one off ``_idle`` (under the lock); when
``_idle`` is 0 every waiting worker has a job promised, so it waits again for it.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable

log = logging.getLogger("hvsock.workers")

_Job = tuple[Callable[[], object], str]

#: Seconds an idle worker waits for a job before its thread ends.
IDLE_TIMEOUT = 2.0


class WorkerPool:
    def __init__(self, max_idle: int = 64, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self._max_idle = max_idle
        self._idle_timeout = idle_timeout
        self._reset()
        _pools.add(self)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._idle = 0

    def run(self, fn: Callable[[], object], name: str) -> None:
        """Run ``fn`` on a worker thread (named ``name`` meanwhile). Nothing reports its end:
        a caller that waits for it says so in ``fn`` (most jobs are pumps nobody waits for,
        and an event per job was a measurable part of a connect's cost)."""
        with self._lock:
            spawn = not self._idle
            if not spawn:
                self._idle -= 1
        self._jobs.put((fn, name))
        if spawn:
            threading.Thread(target=self._work, name=name, daemon=True).start()

    def _work(self) -> None:
        me = threading.current_thread()
        while True:
            try:
                fn, me.name = self._jobs.get(timeout=self._idle_timeout)
            except queue.Empty:
                with self._lock:
                    if self._idle:
                        self._idle -= 1
                        return
                continue  # a job is promised to the waiting workers: this one takes it
            try:
                fn()
            except BaseException:
                log.exception("worker job %s failed", me.name)
            del fn  # nothing of the job outlives it while the worker waits
            with self._lock:
                if self._idle >= self._max_idle:
                    return
                self._idle += 1


_pools: weakref.WeakSet[WorkerPool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A forked child has none of the parent's workers.
    for pool in _pools:
        pool._reset()


os.register_at_fork(after_in_child=_after_fork_in_child)
