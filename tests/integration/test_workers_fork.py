"""The worker pool across fork(): a child does not inherit the parent's worker threads."""

from __future__ import annotations

import os
import threading

import pytest

from hvsock_common.workers import WorkerPool

pytestmark = pytest.mark.integration


def test_a_forked_child_starts_its_own_workers() -> None:
    pool = WorkerPool()
    parent_ran = threading.Event()
    pool.run(parent_ran.set, "test-job-parent")
    assert parent_ran.wait(30)  # leaves an idle worker
    pid = os.fork()
    if pid == 0:  # the child: the parent's idle worker does not exist here
        child_ran = threading.Event()
        pool.run(child_ran.set, "test-job-child")
        ok = child_ran.wait(10)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
