"""The worker pool behind relay pumps: jobs run, idle workers are reused, failures stay put."""

from __future__ import annotations

import logging
import threading

import pytest

from hvsock_common.workers import WorkerPool

pytestmark = pytest.mark.unit


def test_jobs_run_on_a_worker_named_for_them_and_report_done() -> None:
    pool = WorkerPool()
    ran: list[str] = []
    done = pool.run(lambda: ran.append(threading.current_thread().name), "test-job-a")
    assert done.wait(30)
    assert ran == ["test-job-a"]


def test_an_idle_worker_takes_the_next_job_instead_of_a_new_thread() -> None:
    pool = WorkerPool()
    idents: list[int] = []
    for _ in range(20):
        assert pool.run(lambda: idents.append(threading.get_ident()), "test-job-seq").wait(30)
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

    events = [pool.run(blocker, "test-job-block") for _ in range(5)]
    for _ in range(5):
        assert started.acquire(timeout=30)  # all five run at once
    release.set()
    assert all(e.wait(30) for e in events)


def test_a_failing_job_is_logged_and_its_worker_lives_on(caplog: pytest.LogCaptureFixture) -> None:
    pool = WorkerPool()

    def fail() -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="hvsock.workers"):
        assert pool.run(fail, "test-job-fail").wait(30)
    assert "test-job-fail" in caplog.text and "boom" in caplog.text
    assert pool.run(lambda: None, "test-job-after").wait(30)
