"""Selects the ring implementation: the compiled core, or the pure-Python twin on request.

``HVSOCK_RING_IMPL=python`` selects the twin explicitly; anything else uses ``ring._ring``,
and a missing extension is an ImportError (a build problem), never a silent fallback.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

__all__ = [
    "IMPLEMENTATION",
    "Ring",
    "WaitSet",
    "atomic_fetch_or",
    "atomic_load",
    "atomic_store",
    "futex_wait",
    "futex_wake",
]

IMPLEMENTATION: str

if TYPE_CHECKING:
    # Both implementations have the same API; the compiled one's stub is the public type.
    from ._ring import (
        Ring,
        WaitSet,
        atomic_fetch_or,
        atomic_load,
        atomic_store,
        futex_wait,
        futex_wake,
    )

    IMPLEMENTATION = "cython"
elif os.environ.get("HVSOCK_RING_IMPL") == "python":
    from ._pyring import (
        Ring,
        WaitSet,
        atomic_fetch_or,
        atomic_load,
        atomic_store,
        futex_wait,
        futex_wake,
    )

    IMPLEMENTATION = "python"
else:
    from ._ring import (
        Ring,
        WaitSet,
        atomic_fetch_or,
        atomic_load,
        atomic_store,
        futex_wait,
        futex_wake,
    )

    IMPLEMENTATION = "cython"
