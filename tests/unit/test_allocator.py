"""The allocator set-up for large messages (hvsock_common.allocator)."""

from __future__ import annotations

import platform
import sys

import pytest

from hvsock_common.allocator import tune_for_large_messages

pytestmark = pytest.mark.unit


def test_the_thresholds_are_set_exactly_where_glibc_is() -> None:
    # (In this process: harmless, it only keeps large blocks for reuse.)
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert tune_for_large_messages() is glibc
