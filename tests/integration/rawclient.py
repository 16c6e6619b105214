"""A minimal client made of the generated stubs only: tests the API as any language sees it."""

from __future__ import annotations

import itertools
import os
import queue
import threading
from collections.abc import Iterator
from typing import Any

import grpc

from guest_client._handover import Handover
from hvsock.v1 import hvsock_pb2, hvsock_pb2_grpc
from ring import shm


class RawPartition:
    """One attach stream. Answers are matched by request id; unsolicited events are queued."""

    def __init__(self, target: str, hello: hvsock_pb2.Hello) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = hvsock_pb2_grpc.HostServiceStub(self.channel)
        self._requests: queue.SimpleQueue[hvsock_pb2.AttachRequest | None] = queue.SimpleQueue()
        self._ids = itertools.count(1)
        self.answers: dict[int, queue.SimpleQueue[hvsock_pb2.AttachResponse]] = {}
        self.events: queue.SimpleQueue[hvsock_pb2.AttachResponse] = queue.SimpleQueue()
        self._requests.put(hvsock_pb2.AttachRequest(request_id=0, hello=hello))
        self.call = self.stub.Attach(self._iter())
        first = next(self.call)
        self.welcome = first.welcome
        self.ended: grpc.RpcError | None = None
        #: The descriptor socket, once prove_shared_memory() connected it.
        self.handover: Handover | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _iter(self) -> Iterator[hvsock_pb2.AttachRequest]:
        while (request := self._requests.get()) is not None:
            yield request

    def _read(self) -> None:
        try:
            for response in self.call:
                if response.request_id:
                    self.answers.setdefault(response.request_id, queue.SimpleQueue()).put(response)
                else:
                    self.events.put(response)
        except grpc.RpcError as exc:
            self.ended = exc

    def send(self, **kind: Any) -> int:
        request_id = next(self._ids)
        self.answers.setdefault(request_id, queue.SimpleQueue())
        self._requests.put(hvsock_pb2.AttachRequest(request_id=request_id, **kind))
        return request_id

    def answer(self, request_id: int, timeout: float = 10) -> hvsock_pb2.AttachResponse:
        return self.answers[request_id].get(timeout=timeout)

    def request(self, timeout: float = 10, **kind: Any) -> hvsock_pb2.AttachResponse:
        return self.answer(self.send(**kind), timeout)

    def event(self, timeout: float = 10) -> hvsock_pb2.AttachResponse:
        return self.events.get(timeout=timeout)

    def prove_shared_memory(self) -> hvsock_pb2.AttachResponse:
        """Fetch the probe over the host's descriptor socket and prove it."""
        self.handover = Handover(self.welcome.shm_socket, self.welcome.session)
        return self.request(
            prove_shared_memory=hvsock_pb2.ProveSharedMemory(nonce=self.handover.nonce)
        )

    def map_end(self, opened: hvsock_pb2.Channel) -> shm.Channel:
        """Map this session's end of a channel opened on shared memory."""
        assert self.handover is not None
        fd = self.handover.take(opened.channel_id)
        try:
            return shm.Channel.attach_fd(fd, end=opened.shared_memory.end)
        finally:
            os.close(fd)

    def close(self) -> None:
        self._requests.put(None)
        self.call.cancel()
        self.channel.close()
        if self.handover is not None:
            self.handover.close()


class RelayStream:
    """A ChannelData stream that honours credit (send_limit) like a real relay client."""

    def __init__(self, partition: RawPartition, channel_id: int) -> None:
        self._requests: queue.SimpleQueue[hvsock_pb2.ChannelDataRequest | None] = (
            queue.SimpleQueue()
        )
        self._requests.put(
            hvsock_pb2.ChannelDataRequest(
                open=hvsock_pb2.ChannelDataOpen(
                    session=partition.welcome.session, channel_id=channel_id
                )
            )
        )
        self.limits: list[int] = []
        self.sent = 0
        self._credit = threading.Condition()
        self._data: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.call = partition.stub.ChannelData(self._iter())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _iter(self) -> Iterator[hvsock_pb2.ChannelDataRequest]:
        while (request := self._requests.get()) is not None:
            yield request

    def _read(self) -> None:
        try:
            for frame in self.call:
                if frame.send_limit:
                    with self._credit:
                        self.limits.append(frame.send_limit)
                        self._credit.notify_all()
                if frame.data:
                    self._data.put(frame.data)
                if frame.fin:
                    self._data.put(None)
        except grpc.RpcError:
            self._data.put(None)

    def send_all(self, data: bytes, timeout: float = 30) -> None:
        view = memoryview(data)
        while view:
            with self._credit:
                if not self._credit.wait_for(
                    lambda: bool(self.limits) and self.limits[-1] > self.sent, timeout
                ):
                    raise TimeoutError("no credit")
                room = self.limits[-1] - self.sent
            chunk = bytes(view[: min(room, 65536)])
            self.sent += len(chunk)
            self._requests.put(hvsock_pb2.ChannelDataRequest(data=chunk))
            view = view[len(chunk) :]

    def send_fin(self) -> None:
        self._requests.put(hvsock_pb2.ChannelDataRequest(fin=True))

    def read_all(self, timeout: float = 30) -> bytes:
        chunks = []
        while (chunk := self._data.get(timeout=timeout)) is not None:
            chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self._requests.put(None)
        self.call.cancel()
