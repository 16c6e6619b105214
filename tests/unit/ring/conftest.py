"""Fixtures for the ring unit tests: every test runs against both implementations."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest

import ring._pyring as pyring
import ring._ring as cring

IMPLS = {"cython": cring, "python": pyring}


@pytest.fixture(params=sorted(IMPLS))
def impl(request: pytest.FixtureRequest) -> ModuleType:
    """The module (``ring._ring`` or ``ring._pyring``) whose ``Ring`` is under test."""
    return IMPLS[request.param]


@pytest.fixture
def new_ring(impl: ModuleType) -> Callable[..., tuple[bytearray, Any]]:
    """Factory: ``new_ring(pages=3, **kwargs) -> (buffer, initialised Ring)``."""

    def make(pages: int = 3, **kwargs: Any) -> tuple[bytearray, Any]:
        buf = bytearray(pages * 4096)
        kwargs.setdefault("spin_ns", 0)
        return buf, impl.Ring(buf, initialize=True, **kwargs)

    return make
