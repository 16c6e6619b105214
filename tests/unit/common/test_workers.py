"""The worker pool behind relay pumps: jobs run, idle workers are reused, failures stay put."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import pytest

from hvsock_common.workers import WorkerPool

pytestmark = pytest.mark.unit


def run_and_signal(pool: WorkerPool, fn: Callable[[], object], name: str) -> threading.Event:
    """``pool.run(fn, name)``, and an event set once ``fn`` has returned or raised."""
    done = threading.Event()

    def job() -> None:
        try:
            fn()
        finally:
            done.set()

    pool.run(job, name)
    return done


def test_jobs_run_on_a_worker_named_for_them_and_report_done() -> None:
    pool = WorkerPool()
    ran: list[str] = []
    done = run_and_signal(pool, lambda: ran.append(threading.current_thread().name), "test-job-a")
    assert done.wait(30)
    assert ran == ["test-job-a"]


def test_an_idle_worker_takes_the_next_job_instead_of_a_new_thread() -> None:
    pool = WorkerPool()
    idents: list[int] = []
    for _ in range(20):
        assert run_and_signal(
            pool, lambda: idents.append(threading.get_ident()), "test-job-seq"
        ).wait(30)
    # A job's worker may not be idle yet when the next is handed over, so a second thread may
    # start; never one per job.
    assert len(set(idents)) <= 2


def test_blocking_jobs_each_get_a_worker() -> None:
    pool = WorkerPool()
    release = threading.Event()
    started = threading.Semaphore(0)

    def blocker() -> None:
        started.release()
        release.wait()

    events = [run_and_signal(pool, blocker, "test-job-block") for _ in range(5)]
    for _ in range(5):
        assert started.acquire(timeout=30)  # all five run at once
    release.set()
    assert all(e.wait(30) for e in events)


def test_a_failing_job_is_logged_and_its_worker_lives_on() -> None:
    pool = WorkerPool()

    def fail() -> None:
        raise RuntimeError("boom")

    logged: list[str] = []
    seen = threading.Event()

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logged.append(self.format(record))
            seen.set()

    logger = logging.getLogger("hvsock.workers")
    capture = Capture(logging.ERROR)
    logger.addHandler(capture)
    try:
        pool.run(fail, "test-job-fail")
        assert seen.wait(30)  # the pool logs once the job has raised
    finally:
        logger.removeHandler(capture)
    assert "test-job-fail" in logged[0] and "boom" in logged[0]
    assert run_and_signal(pool, lambda: None, "test-job-after").wait(30)
