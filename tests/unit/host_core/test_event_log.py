"""The one event constructor: EventLog.emit stamps, logs and hands out every event of the core."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from host_service.core import Event, ServiceChanged, SessionEnded
from host_service.core.eventlog import EventLog

pytestmark = pytest.mark.unit

CORE = Path(__file__).resolve().parents[3] / "host_service" / "core"


def test_emit_stamps_logs_and_appends() -> None:
    log = EventLog(size=3)
    out: list[Event] = []
    first = log.emit(out, SessionEnded, 1.5, partition="p", session_id=7, reason="r")
    second = log.emit(out, SessionEnded, 2.0, partition="p", session_id=8, reason="r")
    assert (first.at, first.seq, second.at, second.seq) == (1.5, 1, 2.0, 2)
    assert out == [first, second]
    assert log.since(0) == [first, second]
    assert log.since(1) == [second]


def test_the_log_keeps_the_last_events_only() -> None:
    log = EventLog(size=2)
    out: list[Event] = []
    made = [
        log.emit(out, ServiceChanged, 0.0, service_id="s", element_name="e", change="registered")
        for _ in range(3)
    ]
    assert log.since(0) == made[1:]
    assert out == made  # the caller still gets every event


def test_a_missing_field_fails_at_once() -> None:
    with pytest.raises(TypeError):
        EventLog(size=1).emit([], SessionEnded, 0.0, partition="p")


def test_only_the_event_log_stamps_events() -> None:
    # Every other module names the event class and its own fields; ``at`` and ``seq`` are
    # filled in one place, so ``seq`` is strictly increasing in the order events are caused.
    stamping = re.compile(r"\b(at|seq)=")
    offenders = [
        f"{path.name}:{number}"
        for path in sorted(CORE.glob("*.py"))
        if path.name != "eventlog.py"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if stamping.search(line)
    ]
    assert offenders == []
