"""The data plane's map checks: one queue and one loop timer for every end on shared memory."""

from __future__ import annotations

import asyncio
import os

import pytest

from host_service.core.types import RingGeometry, Side
from host_service.dataplane import _MIN_PRUNED, DataPlane, EndPath
from ring import shm

pytestmark = pytest.mark.unit

GEOMETRY = RingGeometry(2, 3)


def _open(dp: DataPlane, channel_id: int, *, map_it: bool, mapped: list[shm.Channel]) -> None:
    def hand_over(fd: int) -> bool:
        if map_it:  # the end maps its rings at once (its own descriptor, as a client would)
            mapped.append(shm.Channel.attach_fd(os.dup(fd), end=1))
        return True

    path, _, _ = dp.open_end(
        channel_id, Side.ACCEPTOR, EndPath.SHARED_MEMORY, GEOMETRY, "vm", 1, hand_over
    )
    assert path is EndPath.SHARED_MEMORY


def test_unmapped_ends_are_reset_once_and_removed_channels_leave_no_checks_behind() -> None:
    async def main() -> tuple[list[int], int]:
        dp = DataPlane(map_timeout=0)  # due at once: the loop's next turns run the checks
        unmapped: list[int] = []
        dp.on_unmapped = lambda channel_id, reason: unmapped.append(channel_id)
        mapped: list[shm.Channel] = []
        for channel_id in range(1, 201):
            _open(dp, channel_id, map_it=channel_id % 50 == 0, mapped=mapped)
        # Most channels go before their check: their entries are pruned, not kept until due.
        for channel_id in range(1, 151):
            dp.remove(channel_id)
        queued = len(dp._map_checks)
        for _ in range(5):
            await asyncio.sleep(0)
        for end in mapped:
            end.close()
        dp.close_all()
        return unmapped, queued

    unmapped, queued = asyncio.run(main())
    # 50 live checks; dead ones are pruned once more than half (and more than a few).
    assert 50 <= queued <= 50 + max(50, _MIN_PRUNED)
    # Channels 151..200 remain; 200 mapped its end, the others never did.
    assert unmapped == list(range(151, 200))
