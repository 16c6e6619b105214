"""The gRPC servicers, in process: how core results and errors reach a client, with time moved
by the test (connect and close timeouts fire when the clock says, not after real waiting)."""

from __future__ import annotations

import errno
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from hvsock.v1 import hvsock_pb2
from hvsock_common import addresses

from .harness import InProcessHost, in_process_host

pytestmark = pytest.mark.adapter

SERVICE = addresses.service_id_for_port(5000)


async def _vm(h: InProcessHost, personality: int = hvsock_pb2.PERSONALITY_LINUX) -> tuple[str, str]:
    created = await h.admin.CreatePartition(
        hvsock_pb2.CreatePartitionRequest(name=f"vm-{personality}", personality=personality),
        metadata=h.admin_metadata,
    )
    return created.partition.vm_id, created.token


async def test_admin_calls_need_the_host_token() -> None:
    async with in_process_host() as h:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await h.admin.ListPartitions(hvsock_pb2.ListPartitionsRequest())
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        listed = await h.admin.ListPartitions(
            hvsock_pb2.ListPartitionsRequest(), metadata=h.admin_metadata
        )
        assert [p.host for p in listed.partitions] == [True]


async def test_a_linux_connect_to_nobody_times_out_when_the_clock_passes_the_timeout() -> None:
    async with in_process_host(connect_timeout=2.0) as h:
        vm_id, token = await _vm(h)
        vm = await h.attach(hvsock_pb2.Hello(vm_id=vm_id, token=token))
        request_id = await vm.send(
            connect=hvsock_pb2.Connect(
                remote=hvsock_pb2.Address(vm_id=addresses.PARENT, service_id=SERVICE)
            )
        )
        await h.until(lambda: h.core.next_deadline() is not None)  # the connect is pending
        h.advance(1.9)
        assert not vm.unsolicited
        h.advance(0.2)
        answer = await vm.answer(request_id)
        assert answer.WhichOneof("kind") == "error"
        assert answer.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        assert answer.error.errno.errno == errno.ETIMEDOUT


async def test_a_windows_connect_to_nobody_is_refused_at_once() -> None:
    async with in_process_host() as h:
        vm_id, token = await _vm(h, hvsock_pb2.PERSONALITY_WINDOWS)
        vm = await h.attach(hvsock_pb2.Hello(vm_id=vm_id, token=token))
        answer = await vm.request(
            connect=hvsock_pb2.Connect(
                remote=hvsock_pb2.Address(vm_id=addresses.PARENT, service_id=SERVICE)
            )
        )
        assert answer.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert answer.error.errno.name == "ECONNREFUSED"


async def test_offer_accept_opens_a_relayed_channel_for_both_ends() -> None:
    async with in_process_host() as h:
        vm_id, token = await _vm(h)
        host = await h.attach(hvsock_pb2.Hello(host=True, token=h.token))
        listening = await host.request(
            listen=hvsock_pb2.Listen(
                address=hvsock_pb2.Address(vm_id=addresses.WILDCARD, service_id=SERVICE)
            )
        )
        assert listening.WhichOneof("kind") == "listening"
        vm = await h.attach(hvsock_pb2.Hello(vm_id=vm_id, token=token))
        connect_id = await vm.send(
            connect=hvsock_pb2.Connect(
                remote=hvsock_pb2.Address(vm_id=addresses.PARENT, service_id=SERVICE)
            )
        )
        offer = (await host.next_unsolicited()).offer
        assert offer.channel.remote.vm_id == vm_id
        accepted = await host.request(accept=hvsock_pb2.Accept(channel_id=offer.channel.channel_id))
        connected = await vm.answer(connect_id)
        for end in (accepted.opened, connected.opened):
            assert end.channel_id == offer.channel.channel_id
            assert end.data_path == hvsock_pb2.DATA_PATH_GRPC_RELAY  # no shm socket here
        assert connected.opened.remote.service_id == SERVICE


async def test_a_channel_one_end_closed_is_rescinded_for_the_other_at_the_close_timeout() -> None:
    async with in_process_host(close_timeout=8.0) as h:
        vm_id, token = await _vm(h)
        host = await h.attach(hvsock_pb2.Hello(host=True, token=h.token))
        await host.request(
            listen=hvsock_pb2.Listen(
                address=hvsock_pb2.Address(vm_id=addresses.WILDCARD, service_id=SERVICE),
                auto_accept=1,
            )
        )
        vm = await h.attach(hvsock_pb2.Hello(vm_id=vm_id, token=token))
        opened = await vm.request(
            connect=hvsock_pb2.Connect(
                remote=hvsock_pb2.Address(vm_id=addresses.PARENT, service_id=SERVICE)
            )
        )
        channel_id = opened.opened.channel_id
        assert (await host.next_unsolicited()).opened.channel_id == channel_id  # auto-accepted
        assert (await vm.request(close=hvsock_pb2.Close(channel_id=channel_id))).HasField("ack")
        h.advance(7.9)
        listed = await h.admin.ListChannels(
            hvsock_pb2.ListChannelsRequest(), metadata=h.admin_metadata
        )
        assert [c.channel_id for c in listed.channels] == [channel_id]
        h.advance(0.2)
        # The end that closed hears nothing more; the other is told why its channel went.
        notice = (await host.next_unsolicited()).notice
        assert (notice.channel_id, notice.kind) == (
            channel_id,
            hvsock_pb2.ChannelNotice.KIND_RESCINDED,
        )
        assert "close timeout" in notice.reason
        assert not vm.unsolicited


async def test_a_request_before_hello_ends_the_stream_invalid_argument() -> None:
    async with in_process_host() as h:
        call = h.host_api.Attach()
        await call.write(
            hvsock_pb2.AttachRequest(request_id=1, shutdown=hvsock_pb2.Shutdown(channel_id=1))
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details() == "the first request must be hello"


async def test_reflection_answers_under_v1_and_v1alpha() -> None:
    async with in_process_host() as h:
        for package in ("grpc.reflection.v1", "grpc.reflection.v1alpha"):
            method = h.channel.stream_stream(
                f"/{package}.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            call = method()
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            response = await call.read()
            await call.done_writing()
            names = {s.name for s in response.list_services_response.service}
            assert {"hvsock.v1.HostService", "grpc.reflection.v1.ServerReflection"} <= names


def _listen(request_id: int, port: int) -> hvsock_pb2.AttachRequest:
    address = hvsock_pb2.Address(
        vm_id=addresses.WILDCARD, service_id=addresses.service_id_for_port(port)
    )
    return hvsock_pb2.AttachRequest(
        request_id=request_id, listen=hvsock_pb2.Listen(address=address)
    )


async def _attached_raw(h: InProcessHost, **hello: Any) -> Any:
    """A host attach stream read message by message (batches left as they came)."""
    call = h.host_api.Attach()
    await call.write(
        hvsock_pb2.AttachRequest(hello=hvsock_pb2.Hello(host=True, token=h.token, **hello))
    )
    welcome = (await call.read()).welcome
    assert welcome.request_batches
    return call


async def _end(call: Any) -> None:
    """End the session: its requests end, then the host ends the stream, with nothing more."""
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF


def _answers(message: hvsock_pb2.AttachResponse) -> list[tuple[int, str, int]]:
    """(request id, kind, errno) of each response in a message."""
    return [
        (one.request_id, one.WhichOneof("kind"), one.error.errno.errno)
        for one in message.batch or (message,)
    ]


@pytest.mark.parametrize("response_batches", [True, False])
async def test_a_request_batch_is_carried_out_in_order_and_each_answered_alone(
    response_batches: bool,
) -> None:
    async with in_process_host() as h:
        call = await _attached_raw(h, response_batches=response_batches)
        # The third listens where the first does: only in order is it the one refused.
        batch = [_listen(1, 5001), _listen(2, 5002), _listen(3, 5001)]
        await call.write(hvsock_pb2.AttachRequest(batch=batch))
        expected = [(1, "listening", 0), (2, "listening", 0), (3, "error", errno.EADDRINUSE)]
        # The three answers are queued by one request message, before the stream sends any:
        # a session that takes batches gets them in one message, any other one each alone.
        messages = [await call.read() for _ in range(1 if response_batches else 3)]
        assert [answer for message in messages for answer in _answers(message)] == expected
        assert all(bool(message.batch) == response_batches for message in messages)
        await _end(call)


async def test_a_batch_with_a_request_id_of_its_own_is_refused_whole() -> None:
    async with in_process_host() as h:
        call = await _attached_raw(h)
        await call.write(hvsock_pb2.AttachRequest(request_id=7, batch=[_listen(1, 5001)]))
        assert _answers(await call.read()) == [(7, "error", errno.EINVAL)]
        # Nothing of that batch was carried out: its address is free.
        await call.write(_listen(8, 5001))
        assert _answers(await call.read()) == [(8, "listening", 0)]
        await _end(call)


async def test_a_batch_inside_a_batch_is_refused_alone() -> None:
    async with in_process_host() as h:
        call = await _attached_raw(h)
        nested = hvsock_pb2.AttachRequest(request_id=2, batch=[_listen(3, 5002)])
        await call.write(
            hvsock_pb2.AttachRequest(batch=[_listen(1, 5001), nested, _listen(4, 5002)])
        )
        answers = [await call.read() for _ in range(3)]
        assert [_answers(answer)[0] for answer in answers] == [
            (1, "listening", 0),
            (2, "error", errno.EINVAL),
            (4, "listening", 0),  # the nested batch's listen on 5002 never happened
        ]
        assert "no batch of its own" in answers[1].error.message
        await _end(call)


async def test_a_batch_above_the_limit_is_refused_request_by_request() -> None:
    async with in_process_host() as h:
        call = await _attached_raw(h, response_batches=True)
        batch = [_listen(request_id, 6000 + request_id) for request_id in range(1, 258)]
        await call.write(hvsock_pb2.AttachRequest(batch=batch))
        answers: list[hvsock_pb2.AttachResponse] = []
        while len(answers) < len(batch):
            message = await call.read()
            answers += message.batch or (message,)
        assert [answer.request_id for answer in answers] == list(range(1, 258))
        assert {(a.error.errno.errno, a.error.message) for a in answers} == {
            (
                errno.EINVAL,
                "a batch holds at most 256 requests (this one held 257): "
                "none of them was carried out",
            )
        }
        # None was: the first address is free.
        await call.write(_listen(300, 6001))
        assert _answers(await call.read()) == [(300, "listening", 0)]
        await _end(call)
