"""Attach messages packed into batches: the one rule the host's responses and the guest
library's requests follow (``AttachRequest.batch``, ``AttachResponse.batch``).

A stream sends one message at a time; what queued up behind the message being sent leaves
together in the next one, at most :data:`MAX_ATTACH_BATCH` items, in queue order. A lone item
goes as it is, never wrapped. A queue ends with ``None``: the items before it still leave.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from .conventions import MAX_ATTACH_BATCH

__all__ = ["next_batch"]

T = TypeVar("T")


def next_batch(
    first: T,
    waiting: Callable[[], int | bool],
    take: Callable[[], T | None],
    wrap: Callable[[list[T]], T],
) -> tuple[T, bool]:
    """The message to send: ``first`` and what is queued behind it (``waiting()`` true means
    ``take()`` returns at once), ``wrap``ped when more than one; and whether the queue's end
    (``None``) was taken."""
    batch = [first]
    while len(batch) < MAX_ATTACH_BATCH and waiting():
        item = take()
        if item is None:
            return (batch[0] if len(batch) == 1 else wrap(batch)), True
        batch.append(item)
    return (batch[0] if len(batch) == 1 else wrap(batch)), False
