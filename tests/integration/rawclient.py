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
        #: request id -> kind of the requests sent; channel id -> (end, Channel) of the
        #: channels this session opened (end 0 connected, 1 accepted).
        self._kinds: dict[int, str] = {}
        self.opened: dict[int, tuple[int, hvsock_pb2.Channel]] = {}
        self._data: SessionStream | None = None
        #: The listener a test helper opened (test_host_api.open_pair).
        self.listener_id = 0
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
                if response.WhichOneof("kind") == "opened":
                    end = 0 if self._kinds.get(response.request_id) == "connect" else 1
                    self.opened[response.opened.channel_id] = (end, response.opened)
                if response.request_id:
                    self.answers.setdefault(response.request_id, queue.SimpleQueue()).put(response)
                else:
                    self.events.put(response)
        except grpc.RpcError as exc:
            self.ended = exc

    def _request(self, kind: dict[str, Any]) -> hvsock_pb2.AttachRequest:
        """A request with the next id, its answer awaited."""
        request_id = next(self._ids)
        self.answers.setdefault(request_id, queue.SimpleQueue())
        self._kinds[request_id] = next(iter(kind), "")
        return hvsock_pb2.AttachRequest(request_id=request_id, **kind)

    def send(self, **kind: Any) -> int:
        request = self._request(kind)
        self._requests.put(request)
        return request.request_id

    def send_batch(self, requests: list[dict[str, Any]]) -> list[int]:
        """Send requests (each a ``kind=message`` dict) in one AttachRequest.batch; their ids."""
        batch = [self._request(kind) for kind in requests]
        self._requests.put(hvsock_pb2.AttachRequest(batch=batch))
        return [request.request_id for request in batch]

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

    def data(self) -> SessionStream:
        """This session's SessionData stream (opened on first use)."""
        if self._data is None:
            self._data = SessionStream(self)
        return self._data

    def close(self) -> None:
        if self._data is not None:
            self._data.close()
        self._requests.put(None)
        self.call.cancel()
        self.channel.close()
        if self.handover is not None:
            self.handover.close()


class SessionStream:
    """A session's SessionData stream: frames in, frames out, dispatched by (channel, end)."""

    def __init__(self, partition: RawPartition) -> None:
        self._requests: queue.SimpleQueue[hvsock_pb2.SessionDataRequest | None] = (
            queue.SimpleQueue()
        )
        self._requests.put(hvsock_pb2.SessionDataRequest(session=partition.welcome.session))
        self.ends: dict[tuple[int, int], RelayStream] = {}
        #: Frames for no registered end (e.g. the resets of hostile frames).
        self.stray: queue.SimpleQueue[hvsock_pb2.RelayFrame] = queue.SimpleQueue()
        self.ended: grpc.RpcError | None = None
        self.done = threading.Event()
        self.call = partition.stub.SessionData(self._iter())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _iter(self) -> Iterator[hvsock_pb2.SessionDataRequest]:
        while (request := self._requests.get()) is not None:
            yield request

    def send(self, *frames: hvsock_pb2.RelayFrame) -> None:
        self._requests.put(hvsock_pb2.SessionDataRequest(frames=frames))

    def _read(self) -> None:
        try:
            for response in self.call:
                for frame in response.frames:
                    end = self.ends.get((frame.channel_id, frame.end))
                    if end is None:
                        self.stray.put(frame)
                    else:
                        end.on_frame(frame)
        except grpc.RpcError as exc:
            self.ended = exc
        finally:
            for end in list(self.ends.values()):
                end.on_end()
            self.done.set()

    def close(self) -> None:
        self._requests.put(None)
        self.call.cancel()


class RelayStream:
    """One relayed channel end on its session's SessionData stream, honouring the send limit
    like a real relay client (it grants itself all the receive credit it could want)."""

    def __init__(self, partition: RawPartition, channel_id: int, end: int | None = None) -> None:
        known, channel = partition.opened[channel_id]
        self.end = known if end is None else end
        self.channel_id = channel_id
        self.key = (channel_id, self.end)
        self.stream = partition.data()
        self.limits: list[int] = [channel.relay_send_limit]
        self.sent = 0
        self.reset: hvsock_pb2.Error | None = None
        self.close_done = False
        self._credit = threading.Condition()
        self._data: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.stream.ends[self.key] = self
        self.frame(credit=1 << 60)

    def frame(self, **fields: Any) -> None:
        self.stream.send(hvsock_pb2.RelayFrame(channel_id=self.channel_id, end=self.end, **fields))

    def on_frame(self, frame: hvsock_pb2.RelayFrame) -> None:
        if frame.credit:
            with self._credit:
                self.limits.append(frame.credit)
                self._credit.notify_all()
        if frame.data:
            self._data.put(frame.data)
        if frame.fin:
            self._data.put(None)
        if frame.HasField("reset") or frame.close_done:
            self.reset = frame.reset if frame.HasField("reset") else None
            self.close_done = frame.close_done
            self.stream.ends.pop(self.key, None)  # later frames for it are strays
            self.on_end()

    def on_end(self) -> None:
        self._data.put(None)
        with self._credit:
            self._credit.notify_all()

    def send_all(self, data: bytes, timeout: float = 30) -> None:
        view = memoryview(data)
        while view:
            with self._credit:
                if not self._credit.wait_for(
                    lambda: self.limits[-1] > self.sent or self.reset is not None, timeout
                ):
                    raise TimeoutError("no credit")
                if self.reset is not None:
                    raise ConnectionResetError(self.reset.message)
                room = self.limits[-1] - self.sent
            chunk = bytes(view[: min(room, 262144)])
            self.sent += len(chunk)
            self.frame(data=chunk)
            view = view[len(chunk) :]

    def send_fin(self) -> None:
        self.frame(fin=True)

    def read_all(self, timeout: float = 30) -> bytes:
        chunks = []
        while (chunk := self._data.get(timeout=timeout)) is not None:
            chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        if self.reset is None and not self.close_done and self.stream.ended is None:
            self.frame(close=True)
