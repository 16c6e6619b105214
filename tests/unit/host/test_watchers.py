"""WatchEvents backlog: a watcher that does not keep up is cut off, its queue dropped."""

from __future__ import annotations

import pathlib

import pytest

from host_service.core.config import HostConfig
from host_service.core.events import ServiceChanged
from host_service.dataplane import DataPlane
from host_service.service import MAX_WATCH_BACKLOG, Host, new_core

pytestmark = pytest.mark.unit


def _host(tmp_path: pathlib.Path) -> Host:
    config = HostConfig()
    return Host(new_core(config, "host-token"), dataplane=DataPlane(config.connect_timeout))


def _event(n: int) -> ServiceChanged:
    return ServiceChanged(at=0.0, seq=n, service_id=f"s{n}", element_name="x", change="registered")


def test_a_watcher_falling_behind_is_cut_off_and_its_backlog_dropped(
    tmp_path: pathlib.Path,
) -> None:
    host = _host(tmp_path)
    slow, keeping_up = host.watch(), host.watch()
    for n in range(MAX_WATCH_BACKLOG + 50):
        host.dispatch([_event(n)])
        while not keeping_up.queue.empty():
            keeping_up.queue.get_nowait()
    assert slow.behind == MAX_WATCH_BACKLOG
    # Only the end marker is left: the memory of the backlog is released at once.
    assert slow.queue.qsize() == 1 and slow.queue.get_nowait() is None
    # It gets nothing more; the watcher that keeps up is untouched.
    host.dispatch([_event(-1)])
    assert slow.queue.empty()
    assert keeping_up.behind is None and keeping_up.queue.qsize() == 1


def test_a_watcher_within_the_backlog_gets_every_event(tmp_path: pathlib.Path) -> None:
    host = _host(tmp_path)
    watcher = host.watch()
    host.dispatch([_event(n) for n in range(MAX_WATCH_BACKLOG)])
    assert watcher.behind is None and watcher.queue.qsize() == MAX_WATCH_BACKLOG
    host.unwatch(watcher)
    host.dispatch([_event(-1)])
    assert watcher.queue.qsize() == MAX_WATCH_BACKLOG
