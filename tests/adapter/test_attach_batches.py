"""AttachRequest.batch against the same requests sent one by one (Hypothesis): whatever the
requests and however they are cut into batches, a fresh host answers exactly as it does when
each comes alone: the same answers, in the same order, to the same request ids, and none to a
notification (request id 0). The batched run also takes AttachResponse.batch, so the answers'
order through the host's packing is checked as well."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvsock.v1 import hvsock_pb2
from hvsock_common import addresses

from .harness import in_process_host

pytestmark = pytest.mark.adapter


def _address(port: int) -> hvsock_pb2.Address:
    return hvsock_pb2.Address(
        vm_id=addresses.WILDCARD, service_id=addresses.service_id_for_port(5200 + port)
    )


# Requests whose answers come at once and depend only on what came before them on the stream
# (a connect's would wait for the peer or the clock). Ids and ports are drawn from small
# ranges, so requests meet: a second listen on an address, an unlisten of a listener that
# exists, a close of a channel that does not.
_kind = st.one_of(
    st.builds(
        lambda port: {"listen": hvsock_pb2.Listen(address=_address(port))}, st.integers(0, 2)
    ),
    st.builds(lambda lid: {"unlisten": hvsock_pb2.Unlisten(listener_id=lid)}, st.integers(0, 4)),
    st.builds(lambda cid: {"close": hvsock_pb2.Close(channel_id=cid)}, st.integers(0, 2)),
    st.builds(lambda cid: {"shutdown": hvsock_pb2.Shutdown(channel_id=cid)}, st.integers(0, 2)),
    st.builds(lambda cid: {"accept": hvsock_pb2.Accept(channel_id=cid)}, st.integers(0, 2)),
    st.just({}),  # no kind: an error answer
)
#: (kind, notification?) per request; cut points splitting them into messages.
_requests = st.lists(st.tuples(_kind, st.booleans()), min_size=1, max_size=12)


def _built(requests: list[tuple[dict[str, Any], bool]]) -> list[hvsock_pb2.AttachRequest]:
    return [
        hvsock_pb2.AttachRequest(request_id=0 if notify else index + 1, **kind)
        for index, (kind, notify) in enumerate(requests)
    ]


async def _answers(
    messages: list[hvsock_pb2.AttachRequest], expected: int, batches: bool
) -> list[tuple[int, str | None, int, int]]:
    """(request id, kind, errno, listener id) of each answer a fresh host gives."""
    async with in_process_host() as h:
        call = h.host_api.Attach()
        hello = hvsock_pb2.Hello(host=True, token=h.token, response_batches=batches)
        await call.write(hvsock_pb2.AttachRequest(hello=hello))
        assert (await call.read()).welcome.request_batches
        for message in messages:
            await call.write(message)
        answers: list[tuple[int, str | None, int, int]] = []
        while len(answers) < expected:
            message = await asyncio.wait_for(call.read(), 5)
            assert batches or not message.batch
            answers += [
                (
                    one.request_id,
                    one.WhichOneof("kind"),
                    one.error.errno.errno,
                    one.listening.listener_id,
                )
                for one in message.batch or (message,)
            ]
        # Nothing more: a notification is never answered. A last listen, answered, shows
        # that nothing else was queued before it.
        await call.write(
            hvsock_pb2.AttachRequest(request_id=1000, listen=hvsock_pb2.Listen(address=_address(9)))
        )
        last = await asyncio.wait_for(call.read(), 5)
        assert [one.request_id for one in last.batch or (last,)] == [1000]
        # Ending the requests ends the session and then the stream, with nothing more.
        await call.done_writing()
        assert await asyncio.wait_for(call.read(), 5) is grpc.aio.EOF
        return answers


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(requests=_requests, cuts=st.lists(st.integers(1, 12), max_size=6))
def test_batched_requests_are_answered_as_if_each_came_alone(
    event_loop: asyncio.AbstractEventLoop,
    requests: list[tuple[dict[str, Any], bool]],
    cuts: list[int],
) -> None:
    built = _built(requests)
    expected = sum(request.request_id != 0 for request in built)
    edges = sorted({0, len(built), *(cut for cut in cuts if cut < len(built))})
    batched = [
        hvsock_pb2.AttachRequest(batch=built[start:stop])
        for start, stop in itertools.pairwise(edges)
    ]
    alone = event_loop.run_until_complete(_answers(built, expected, batches=False))
    together = event_loop.run_until_complete(_answers(batched, expected, batches=True))
    assert together == alone
    assert [answer[0] for answer in alone] == [r.request_id for r in built if r.request_id]
