"""Adapter tests are coroutines, run one after another on one event loop for the whole session:
grpc.aio binds its completion queue to the first loop that uses it, so a loop per test would
leave it polling a closed loop."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="session")
def event_loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: Any) -> bool | None:
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    arguments = {name: pyfuncitem.funcargs[name] for name in names}
    loop: asyncio.AbstractEventLoop = pyfuncitem._request.getfixturevalue("event_loop")
    loop.run_until_complete(pyfuncitem.obj(**arguments))
    return True
