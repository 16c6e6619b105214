"""The attach stream's outgoing requests: in order, one message each until the host takes
batches, then whatever queued up while the stream was busy in one message of at most
MAX_ATTACH_BATCH."""

from __future__ import annotations

import pytest

from guest_client._partition import AttachOutbox
from hvsock.v1 import hvsock_pb2
from hvsock_common.conventions import MAX_ATTACH_BATCH

pytestmark = pytest.mark.unit


def _close(request_id: int) -> hvsock_pb2.AttachRequest:
    return hvsock_pb2.AttachRequest(
        request_id=request_id, close=hvsock_pb2.Close(channel_id=request_id)
    )


def _sent(outbox: AttachOutbox) -> list[list[int]]:
    """Each message the stream would send, as the request ids it carries."""
    return [[request.request_id for request in (message.batch or (message,))] for message in outbox]


def _filled(count: int, batches: bool) -> AttachOutbox:
    outbox = AttachOutbox()
    outbox.batches = batches
    for request_id in range(1, count + 1):
        outbox.put(_close(request_id))
    outbox.put(None)
    return outbox


def test_before_the_host_takes_batches_each_request_goes_alone() -> None:
    assert _sent(_filled(3, batches=False)) == [[1], [2], [3]]


def test_queued_requests_leave_together_in_order_up_to_the_limit() -> None:
    count = MAX_ATTACH_BATCH + 3
    sent = _sent(_filled(count, batches=True))
    assert sent == [
        list(range(1, MAX_ATTACH_BATCH + 1)),
        list(range(MAX_ATTACH_BATCH + 1, count + 1)),
    ]


def test_a_lone_request_is_not_wrapped_in_a_batch() -> None:
    outbox = _filled(1, batches=True)
    (message,) = list(outbox)
    assert not message.batch and message.request_id == 1


def test_the_end_ends_the_stream_after_what_was_queued_before_it() -> None:
    outbox = _filled(2, batches=True)
    outbox.put(_close(9))  # after the end: never sent
    assert _sent(outbox) == [[1, 2]]
