"""next_batch: the batching rule shared by the host's responses and the library's requests."""

from __future__ import annotations

import collections

import pytest

from hvsock_common.batching import next_batch
from hvsock_common.conventions import MAX_ATTACH_BATCH

pytestmark = pytest.mark.unit


def _take_all(items: list[int | None]) -> list[tuple[object, bool]]:
    queue = collections.deque(items)
    messages = []
    while queue:
        first = queue.popleft()
        assert first is not None
        message, ended = next_batch(first, lambda: bool(queue), queue.popleft, tuple)
        messages.append((message, ended))
        if ended:
            break
    return messages


def test_a_lone_item_goes_unwrapped() -> None:
    assert _take_all([7]) == [(7, False)]


def test_queued_items_leave_together_in_order_up_to_the_limit() -> None:
    count = MAX_ATTACH_BATCH + 2
    (first, _), (second, _) = _take_all(list(range(count)))
    assert first == tuple(range(MAX_ATTACH_BATCH))
    assert second == (MAX_ATTACH_BATCH, MAX_ATTACH_BATCH + 1)


def test_the_end_is_reported_after_the_items_before_it() -> None:
    assert _take_all([1, 2, None, 3]) == [((1, 2), True)]
    assert _take_all([1, None]) == [(1, True)]
