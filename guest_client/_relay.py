"""One session's SessionData stream: the data of all its relayed channel ends.

A :class:`Link` belongs to one attach session (one generation of a :class:`._partition.
Partition`). The stream opens with the first relayed end and lives as long as the session;
opening another channel costs no RPC. Threads, beside the program's own:

* gRPC's request consumer pulls :meth:`Link._requests`: each message carries the frames of
  every end with work (credit, data up to 256 KiB per frame and about 1 MiB per message, FIN,
  close), so small sends of many sockets travel together and large ones in large frames;
  messages are encoded by hand (``hvsock_common.relaywire``: each data byte copied once);
* the stream thread (``hvsock-relay``, a pooled worker) reads the responses and hands each
  frame to its end without ever blocking: credit takes effect at once, data is appended to the
  end's receive buffer (bounded by the credit it granted).

Early frames. The stream says ``early_frames``, so the host credits an end that opens while
the stream is open with its receive window (``Channel.relay_receive_credited``): the end sends
no first credit, and the host may send it data and FIN before the attach stream's reader has
built it (the two streams are not ordered). Such frames are held in ``_early`` until
:meth:`Link.open_end` registers the end. Only a NOT_FOUND reset comes for an end this link
never registers or has forgotten (the answer to frames that crossed a reset); it is dropped.

Locking: one lock per link guards the link and every one of its ends (their ``tx`` and ``rx``
conditions are built on it), so a frame, a grant and a wake-up are applied atomically. An end
with work is put on ``_ready`` (at most once) by its ``kick``; the request consumer drains it.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import grpc
from grpc_status import rpc_status

from hvsock.v1 import hvsock_pb2
from hvsock_common.allocator import tune_for_large_messages
from hvsock_common.relaywire import REQUEST_FRAMES, Frame, FrameWriter, decode_response, kept
from hvsock_common.workers import WorkerPool

from ._pipe import RelayPipe

log = logging.getLogger("hvsock.client")

#: Data bytes in one request, about (the host takes messages of up to 1 MiB).
MAX_REQUEST_DATA = 1_000_000

#: The method's path. Its requests are encoded and its responses decoded by hand
#: (hvsock_common.relaywire: frame data is copied once each way), so the call is made without
#: the stub's serializer and deserializer.
_SERVICE = hvsock_pb2.DESCRIPTOR.services_by_name["HostService"]
SESSION_DATA = f"/{_SERVICE.full_name}/{_SERVICE.methods_by_name['SessionData'].name}"

#: google.rpc.Code NOT_FOUND: a reset for an end the host does not know (or no longer).
_NOT_FOUND = 5


def _decode_frames(raw: bytes) -> list[Frame]:
    """A SessionDataResponse's frames (``relaywire.decode_response``), any reset's Error checked
    by protobuf here, where a malformed response fails the call as protobuf's parse would."""
    frames = decode_response(raw)
    for frame in frames:
        if frame.reset is not None:
            hvsock_pb2.Error.FromString(frame.reset)
    return frames


#: Runs each session's stream thread.
_WORKERS = WorkerPool()

#: Set to "0" to leave the process's allocator as it is (see :func:`_tune_allocator`).
TUNE_ENV = "HVSOCK_RELAY_TUNE_MALLOC"
_tuned = False


def _tune_allocator() -> None:
    """Once per process, when it first relays: large blocks (the stream's 1 MiB messages) are
    reused rather than mapped afresh for each (``hvsock_common.allocator``): measured, a
    quarter less CPU per relayed byte in each client. It is the whole program's allocator, so
    ``HVSOCK_RELAY_TUNE_MALLOC=0`` leaves it alone."""
    global _tuned
    if not _tuned:
        _tuned = True
        if os.environ.get(TUNE_ENV, "1") != "0":
            tune_for_large_messages()


class Link:
    """The SessionData stream of one session and its relayed ends."""

    def __init__(self, channel: grpc.Channel, session: str) -> None:
        self._session_data = channel.stream_stream(
            SESSION_DATA, response_deserializer=_decode_frames
        )
        self._session = session
        self.lock = threading.Lock()
        # The request consumer, out of work, waits on ``_wakeup`` (after setting ``_idle``
        # under the lock); whoever next gives it work or ends the link clears ``_idle`` and
        # puts one token. So a token is put only for a consumer committed to waiting, and it
        # takes exactly that one: none is lost or left over. (A SimpleQueue hand-off is C
        # code; a Condition's wait and notify are Python, a lock allocated per wait.)
        self._wakeup: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._idle = False
        self._pipes: dict[tuple[int, int], RelayPipe] = {}
        self._ready: collections.deque[RelayPipe] = collections.deque()
        self._queued: set[tuple[int, int]] = set()
        # Frames for ends not registered yet (see "Early frames" above), in arrival order.
        self._early: dict[tuple[int, int], list[Frame]] = {}
        self._started = False
        self._over = False  # the stream ended (or the link was closed)
        self._call: Any = None  # the stream, once open (cancelled by close())

    def open_end(self, channel: hvsock_pb2.Channel, end: int) -> RelayPipe:
        """A relayed end of this session. The frames that came for it before it was built are
        applied first; an end the host did not credit as it opened gets its first credit
        queued (the host sends it nothing before that)."""
        with self.lock:
            pipe = RelayPipe(self.lock, self._kick, channel, end)
            if self._over:
                pipe.lost()
                return pipe
            for frame in self._early.pop(pipe.key, ()):
                pipe.on_frame(frame)
            if pipe.over:
                return pipe
            self._pipes[pipe.key] = pipe
            if pipe.pending():
                self._kick(pipe)
            start = not self._started
            self._started = True
        if start:
            _tune_allocator()
            # The stream is opened on a worker: opening one costs about 0.3 ms that neither
            # connect() nor the attach reader, which builds this end, should wait for.
            _WORKERS.run(self._run, "hvsock-relay")
        return pipe

    def _kick(self, pipe: RelayPipe) -> None:
        """``pipe`` has work for the stream (lock held)."""
        if pipe.key not in self._queued:
            self._queued.add(pipe.key)
            self._ready.append(pipe)
            self._wake_consumer()

    def _wake_consumer(self) -> None:
        """The consumer has work, or the link is over (lock held)."""
        if self._idle:
            self._idle = False
            self._wakeup.put(None)

    # -- socket -> host ----------------------------------------------------------------------

    def _requests(self) -> Iterator[bytes]:
        """The request stream, pulled by gRPC's consumer thread one message at a time."""
        yield hvsock_pb2.SessionDataRequest(
            session=self._session, early_frames=True
        ).SerializeToString()
        ready, queued, lock = self._ready, self._queued, self.lock
        while True:
            with lock:
                while not ready and not self._over:
                    self._idle = True
                    lock.release()
                    try:
                        self._wakeup.get()
                    finally:
                        lock.acquire()
                if self._over:
                    return
                frames, budget = FrameWriter(REQUEST_FRAMES), MAX_REQUEST_DATA
                # Round robin: an end with more than this message takes goes to the back.
                for _ in range(len(ready)):
                    pipe = ready.popleft()
                    # Frames of one end while it has data, the message has room and no other
                    # end waits: a lone busy end fills the message (four 256 KiB frames), as
                    # every message costs each process on its way far more than its bytes do;
                    # busy ends side by side still take a frame each in turn.
                    while True:
                        took = pipe.frames(frames, budget)
                        budget -= took
                        if not took or budget <= 0 or ready or not pipe.pending():
                            break
                    if pipe.pending():
                        ready.append(pipe)
                    else:
                        queued.discard(pipe.key)
                    if pipe.over:
                        self._pipes.pop(pipe.key, None)
                    if budget <= 0:
                        break
            if frames.count:
                yield frames.message()

    # -- host -> socket ----------------------------------------------------------------------

    def _run(self) -> None:
        lost = False
        try:
            call = self._session_data(self._requests())
            with self.lock:
                self._call = call
                if self._over:
                    call.cancel()
            for frames in call:
                with self.lock:
                    self._route(frames)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                # Cancelled here (close(), or the attach stream found the host gone), maybe
                # after the host's own status arrived: the ends still open are lost.
                lost = True
            else:
                log.debug("session data stream ended: %s", exc)
                # The host ends the stream with a status carrying an errno detail when the
                # session ends; one without is the transport failing (the host went away).
                lost = rpc_status.from_call(exc) is None
        except ValueError:  # the partition closed its gRPC channel before the stream opened
            lost = True
        self._end(lost)

    def _route(self, frames: Iterable[Frame]) -> None:
        """Hand the host's frames to their ends (lock held)."""
        pipes = self._pipes
        for frame in frames:
            key = (frame.channel_id, frame.end)
            pipe = pipes.get(key)
            if pipe is not None:
                pipe.on_frame(frame)
                if pipe.over:
                    del pipes[key]
            elif frame.reset is None or hvsock_pb2.Error.FromString(frame.reset).code != _NOT_FOUND:
                frame.data = kept(frame.data)  # held until the end is built
                self._early.setdefault(key, []).append(frame)

    def _end(self, lost: bool) -> None:
        with self.lock:
            self._over = True
            self._early.clear()
            pipes = list(self._pipes.values())
            self._pipes.clear()
            for pipe in pipes:
                if not lost:
                    pipe.ended_by_host = True
                pipe.lost()
            self._wake_consumer()
        if lost:
            for pipe in pipes:
                pipe.on_lost()

    def close(self) -> None:
        """The session is over: end the stream; ends still open are lost."""
        with self.lock:
            self._over = True
            self._wake_consumer()
            call = self._call
        if call is not None:
            call.cancel()
