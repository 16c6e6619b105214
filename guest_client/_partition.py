"""A partition's attachment to the host service: the attach stream and what arrives on it.

Threads: requests are queued by any thread and written by gRPC's request-consumer thread; one
reader thread (``hvsock-attach``) receives every answer and event and routes it. When the host
offers control frames on its descriptor socket (``Welcome.control_socket``) and this process
maps shared memory, the session moves there after the welcome: requests are written by the
calling thread itself, and the descriptor socket's reader (``hvsock-control``) routes what
arrives, at a fraction of a gRPC message's cost; the attach stream stays open, silent, and its
reader only notices the host going away. Either way, what is routed:

* answers wake the caller waiting on that request id (:class:`_Pending`);
* an ``offer`` for a listener with backlog room is accepted at once (the kernel, not the
  program, accepts on Linux and Windows); the opened channel is queued for ``accept()``;
* notices (peer FIN, rescind, connect failure) go to the channel's :class:`ChannelEnd`.

If the stream breaks (the host service stopped), every open channel is reset and the partition
attaches again in the background with the same VM id and token, so new sockets work once the
host is back; sockets open at that moment fail with ``ConnectionResetError``.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from hvsock.v1 import hvsock_pb2, hvsock_pb2_grpc
from hvsock_common.batching import next_batch

from . import _pipe, errors
from ._channel import ChannelEnd, Listener
from ._handover import Handover
from ._relay import Link
from ._socket import HvSocket

log = logging.getLogger("hvsock.client")

#: What ``data_path=`` / HVSOCK_DATA_PATH may say: choose per end, force shared memory, or force
#: the relay. "relay" is also what ``HvSocket.data_path`` and ``hvsock channels`` report.
DATA_PATHS = ("auto", "shm", "relay")
#: The relay's name before it had one name everywhere; accepted for one more release.
_OLD_RELAY_NAME = "grpc"
#: Personality names (attach(), the CLI) -> the API's values.
PERSONALITIES = {
    "linux": hvsock_pb2.PERSONALITY_LINUX,
    "windows": hvsock_pb2.PERSONALITY_WINDOWS,
}
#: How long the reader waits before attaching again after the host went away (doubles to 2 s).
_REATTACH_DELAYS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
#: Seconds the host has to acknowledge ProveSharedMemory.
_HANDOVER_PROOF_TIMEOUT = 10.0
#: Seconds the attach stream has to end by itself after the descriptor socket carrying the
#: session's requests broke, before it is ended here.
_CONTROL_LOSS_GRACE = 2.0

_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 1 << 20),
]


class _Pending:
    """One request waiting for its answer."""

    __slots__ = ("answer", "done", "on_answer")

    def __init__(self, on_answer: Callable[[hvsock_pb2.AttachResponse], None] | None) -> None:
        self.done = threading.Event()
        self.answer: hvsock_pb2.AttachResponse | None = None
        self.on_answer = on_answer


def _data_path_choice(argument: str | None) -> str:
    """The data path asked for by ``argument``, else by HVSOCK_DATA_PATH, else "auto"."""
    choice = argument or os.environ.get("HVSOCK_DATA_PATH", "auto")
    if choice == _OLD_RELAY_NAME:
        where = "data_path=" if argument else "HVSOCK_DATA_PATH="
        message = f'{where}"grpc" is deprecated, use "relay" (the same gRPC relay)'
        # A program sees the warning; an operator who set the environment sees the log line
        # (Python hides DeprecationWarning outside __main__ by default).
        warnings.warn(message, DeprecationWarning, stacklevel=3)
        if not argument:
            log.warning(message)
        return "relay"
    if choice not in DATA_PATHS:
        raise ValueError(f"HVSOCK_DATA_PATH must be auto, shm or relay, not {choice!r}")
    return choice


class Partition:
    """A VM or the host partition, attached to the host service."""

    def __init__(
        self,
        target: str,
        hello: hvsock_pb2.Hello,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        data_path: str | None = None,
        shm_socket: str | None = None,
    ) -> None:
        self.target = target
        self._hello = hello
        self._credentials = credentials
        self.data_path = _data_path_choice(data_path)
        #: Where this process reaches the host's descriptor socket, when not where the host
        #: says (a volume mounted at another path): HVSOCK_SHM_SOCKET.
        self.shm_socket = shm_socket or os.environ.get("HVSOCK_SHM_SOCKET") or None
        self._handover: Handover | None = None
        #: The descriptor connection, once this session's requests and answers go there.
        self._control: Handover | None = None
        #: The session's SessionData stream (opened with its first relayed end).
        self._link: Link | None = None
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._channels: dict[int, ChannelEnd] = {}
        self._listeners: dict[int, Listener] = {}
        self._closed = False
        self._stopping = False  # shutdown() under way: the end of the stream is no loss
        self._reader: threading.Thread | None = None
        self._generation = 0
        self._attached = threading.Event()
        self._lost = threading.Event()  # set from losing the host until attached again
        self._attach_error: OSError | None = None
        self._channel = self._open_channel()
        self._attach()
        if self._attach_error is not None:
            self._closed = True
            self._channel.close()
            raise self._attach_error

    # -- attaching ---------------------------------------------------------------------------

    def _open_channel(self) -> grpc.Channel:
        if self._credentials is not None:
            return grpc.secure_channel(self.target, self._credentials, options=_CHANNEL_OPTIONS)
        return grpc.insecure_channel(self.target, options=_CHANNEL_OPTIONS)

    def _attach(self) -> None:
        """Open the attach stream and read the welcome (called again after the host restarts)."""
        self.stub = hvsock_pb2_grpc.HostServiceStub(self._channel)
        requests = AttachOutbox()
        request = hvsock_pb2.AttachRequest(hello=self._hello)  # a copy: the caller's stays as is
        request.hello.response_batches = True
        requests.put(request)
        self._pending: dict[int, _Pending] = {}
        self._requests = requests
        call = self.stub.Attach(iter(requests), wait_for_ready=True)
        try:
            first = next(call)
        except grpc.RpcError as exc:
            self._attach_error = errors.from_rpc_error(exc)
            return
        except StopIteration:
            self._attach_error = ConnectionResetError(errno.ECONNRESET, "host closed the stream")
            return
        welcome = first.welcome
        requests.batches = welcome.request_batches
        self.vm_id = welcome.vm_id
        self.name = welcome.name
        self.is_host = welcome.host
        self.personality = (
            hvsock_pb2.Personality.Name(welcome.personality).removeprefix("PERSONALITY_").lower()
        )
        self.session = welcome.session
        self.limits = welcome.limits
        if welcome.token:  # a VM created on attach: keep its credentials to attach again
            self._hello = hvsock_pb2.Hello(vm_id=welcome.vm_id, token=welcome.token)
            self.token = welcome.token
        elif not self._hello.host and self._hello.vm_id:
            self.token = self._hello.token
        self._call = call
        self._attach_error = None
        self._generation += 1
        self.shm = False
        reader = threading.Thread(
            target=self._read, args=(call, self._generation), name="hvsock-attach", daemon=True
        )
        reader.start()
        self._reader = reader
        # Attached only once the proof is done: a connect made as soon as wait_attached()
        # returns must already get shared memory.
        if welcome.shm_socket and self.data_path != "relay":
            self._prove_shared_memory(
                self.shm_socket or welcome.shm_socket, welcome.session, welcome.control_socket
            )
        if self.data_path == "shm" and not self.shm:
            # End this session (its reader, one generation behind now, lets it go quietly).
            self._generation += 1
            self._requests.put(None)
            call.cancel()
            self._attach_error = OSError(
                errno.EOPNOTSUPP,
                "HVSOCK_DATA_PATH=shm but this process cannot map the host's shared memory",
            )
            return
        self._lost.clear()
        self._attached.set()

    def _prove_shared_memory(self, address: str, secret: str, control: bool) -> None:
        """Receive and map the host's probe over its descriptor socket and prove it (there,
        moving the session's requests and answers to it, when the host offers ``control``);
        any failure leaves this session on the relay."""
        try:
            handover = Handover(address, secret)
        except OSError as exc:
            # Another machine, container or user: the socket is not reachable from here.
            log.debug("no shared memory via %s (%s): using the relay", address, exc)
            return
        if control:
            generation, call = self._generation, self._call

            def cancel() -> None:
                if generation == self._generation and not (self._closed or self._stopping):
                    call.cancel()

            def lost(reason: str) -> None:
                # The attach stream's reader is the one place that handles losing the host.
                # Whenever the host closes this connection it ends the session's stream too,
                # with the reason the program should hear (e.g. "partition stopped"): give
                # that a moment to arrive before ending the stream here.
                log.debug("descriptor socket lost (%s)", reason)
                timer = threading.Timer(_CONTROL_LOSS_GRACE, cancel)
                timer.daemon = True
                timer.start()

            handover.start_control(self._route, lost)
            self._control = handover
        pending = self._send(prove_shared_memory=hvsock_pb2.ProveSharedMemory(nonce=handover.nonce))
        if (
            pending.done.wait(_HANDOVER_PROOF_TIMEOUT)
            and pending.answer is not None
            and (pending.answer.WhichOneof("kind") == "ack")
        ):
            self._handover = handover
            self.shm = True
        else:
            self._control = None
            handover.close()

    def _read(self, call: Any, generation: int) -> None:
        try:
            for message in call:
                for response in message.batch or (message,):
                    self._route(response)
        except grpc.RpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}"
        else:
            reason = "attach stream ended"
        if self._closed or self._stopping or generation != self._generation:
            return
        log.info("partition %s lost the host (%s); attaching again", self.vm_id, reason)
        self._connection_lost(reason)
        self._reattach()

    def _connection_lost(self, reason: str) -> None:
        self._attached.clear()
        self._lost.set()
        self._drop_handover()
        self._drop_link()
        with self._lock:
            channels = list(self._channels.values())
            listeners = list(self._listeners.values())
            pending = list(self._pending.values())
            self._channels.clear()
            self._listeners.clear()
            self._pending.clear()
        for end in channels:
            end.connection_lost()
        for listener in listeners:
            listener.reset = True
            listener.notify()
        lost = hvsock_pb2.AttachResponse(
            error=hvsock_pb2.Error(
                code=grpc.StatusCode.UNAVAILABLE.value[0],
                message=f"lost the host service: {reason}",
                errno=hvsock_pb2.ErrnoDetail(errno=errno.ECONNRESET, name="ECONNRESET"),
            )
        )
        for waiter in pending:
            waiter.answer = lost
            waiter.done.set()

    def _reattach(self) -> None:
        self._requests.put(None)
        delays = itertools.chain(_REATTACH_DELAYS, itertools.repeat(_REATTACH_DELAYS[-1]))
        stop = threading.Event()
        while not self._closed:
            self._attach()
            if self._attach_error is None:
                log.info("partition %s attached again", self.vm_id)
                return
            stop.wait(next(delays))

    def wait_attached(self, timeout: float | None = None) -> bool:
        """Wait until the partition is attached (again, after the host restarted)."""
        return self._attached.wait(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    def wait_lost(self, timeout: float | None = None) -> bool:
        """Wait until the partition loses the host (its sockets are then reset and it attaches
        again by itself) or is closed; True once that happened."""
        return self._lost.wait(timeout)

    # -- requests ------------------------------------------------------------------------------

    def send_request(
        self,
        on_answer: Callable[[hvsock_pb2.AttachResponse], None] | None = None,
        **kind: Any,
    ) -> _Pending:
        if self._closed:
            raise OSError(errno.EBADF, "partition is closed")
        if not self._attached.is_set():
            raise ConnectionResetError(errno.ECONNRESET, "the host service is not reachable")
        return self._send(on_answer, **kind)

    def _send(
        self, on_answer: Callable[[hvsock_pb2.AttachResponse], None] | None = None, **kind: Any
    ) -> _Pending:
        request_id = next(self._ids)
        pending = _Pending(on_answer)
        with self._lock:
            self._pending[request_id] = pending
        self._put(hvsock_pb2.AttachRequest(request_id=request_id, **kind))
        return pending

    def notify(self, **kind: Any) -> None:
        """A request nobody waits on (close, shutdown, unlisten): request id 0, never
        answered, so the host spends no message on an acknowledgement."""
        if self._closed or not self._attached.is_set():
            return  # nothing to tell a host that is gone: it has dropped the channel already
        self._put(hvsock_pb2.AttachRequest(request_id=0, **kind))

    def _put(self, request: hvsock_pb2.AttachRequest) -> None:
        control = self._control
        if control is None:
            self._requests.put(request)
            return
        # A broken connection means the host is gone: the control reader reports it, and
        # whoever waits on an answer gets the loss (_connection_lost answers every pending one).
        with contextlib.suppress(OSError):
            control.send(request)

    def request(self, timeout: float | None = None, **kind: Any) -> hvsock_pb2.AttachResponse:
        """Send a request and wait for its answer; an in-stream error becomes an OSError."""
        pending = self.send_request(**kind)
        if not pending.done.wait(timeout):
            raise TimeoutError(errno.ETIMEDOUT, "timed out waiting for the host service")
        answer = pending.answer
        assert answer is not None
        if answer.WhichOneof("kind") == "error":
            raise errors.from_error(answer.error)
        return answer

    def _route(self, response: hvsock_pb2.AttachResponse) -> None:
        kind = response.WhichOneof("kind")
        if response.request_id:
            with self._lock:
                pending = self._pending.pop(response.request_id, None)
            if pending is None:
                return
            pending.answer = response
            if pending.on_answer is not None:
                pending.on_answer(response)
            pending.done.set()
        elif kind == "offer":
            self._offered(response.offer)
        elif kind == "notice":
            with self._lock:
                end = self._channels.get(response.notice.channel_id)
            if end is not None:
                end.on_notice(response.notice)
        elif kind == "opened":
            self._auto_opened(response.opened)

    def _auto_opened(self, channel: hvsock_pb2.Channel) -> None:
        """An opening the host accepted on a listener's behalf (or one nobody waits for any
        more, which is closed)."""
        with self._lock:
            listener = self._listeners.get(channel.listener_id) if channel.listener_id else None
        if listener is None or listener.closed:
            if channel.data_path == hvsock_pb2.DATA_PATH_GRPC_RELAY:
                # Closed on its stream like any relayed end: the link takes the frames the
                # host may have sent it already (a credited end's), and its close_done.
                end = self._open_on_reader(channel, 1)
                if end is not None:
                    end.close()
            else:
                self.notify(close=hvsock_pb2.Close(channel_id=channel.channel_id))
            return
        end = self._open_on_reader(channel, 1)
        if end is not None:
            listener.ready.append(end)
            listener.notify()

    def _offered(self, offer: hvsock_pb2.Offer) -> None:
        with self._lock:
            listener = self._listeners.get(offer.listener_id)
            room = listener is not None and not listener.closed and listener.has_room()
            if room:
                assert listener is not None
                listener.accepting += 1
        if not room or listener is None:
            # Backlog full (or the listener is going away): a guest ignores the connection
            # request, so the connector times out — as on Linux.
            return

        def opened(answer: hvsock_pb2.AttachResponse) -> None:
            with self._lock:
                listener.accepting -= 1
            if answer.WhichOneof("kind") != "opened":
                listener.notify()
                return
            end = self._open_on_reader(answer.opened, 1)
            if end is None:
                listener.notify()
                return
            if listener.closed:
                end.close()
            else:
                listener.ready.append(end)
            listener.notify()

        self.send_request(
            on_answer=opened,
            accept=hvsock_pb2.Accept(
                channel_id=offer.channel.channel_id,
                force_relay=not self.shm,
                relay_window=listener.relay_window,
            ),
        )

    # -- channels and listeners ----------------------------------------------------------------

    def _drop_handover(self) -> None:
        handover, self._handover = self._handover, None
        self._control = None
        if handover is not None:
            handover.close()

    def _drop_link(self) -> None:
        with self._lock:
            link, self._link = self._link, None
        if link is not None:
            link.close()

    def open_end(self, channel: hvsock_pb2.Channel, end: int) -> ChannelEnd:
        """This session's end of an opened channel. If its rings cannot be mapped (no
        descriptor, out of descriptors, a bad segment) the channel is reset (Close.reset: the
        peer sees a rescind) and the error is raised here: it fails this channel, nothing
        else."""
        pipe: _pipe.Pipe
        if channel.data_path == hvsock_pb2.DATA_PATH_SHARED_MEMORY:
            try:
                pipe = self._map_end(channel)
            except OSError:
                self.notify(close=hvsock_pb2.Close(channel_id=channel.channel_id, reset=True))
                raise
        else:
            with self._lock:
                link = self._link
                if link is None:
                    link = self._link = Link(self._channel, self.session)
            pipe = link.open_end(channel, end)
        channel_end = ChannelEnd(self, channel, pipe)
        if isinstance(pipe, _pipe.RelayPipe):
            pipe.on_lost = channel_end.connection_lost
        with self._lock:
            self._channels[channel_end.channel_id] = channel_end
        return channel_end

    def _open_on_reader(self, channel: hvsock_pb2.Channel, end: int) -> ChannelEnd | None:
        """open_end() for an accepted opening, on the attach reader: a failure costs that
        channel (reset, logged) and never the reader, which serves the whole partition."""
        try:
            return self.open_end(channel, end)
        except OSError as exc:
            log.warning("channel %d could not be opened: %s", channel.channel_id, exc)
            return None

    def _map_end(self, channel: hvsock_pb2.Channel) -> _pipe.ShmPipe:
        handover = self._handover
        if handover is None:
            raise ConnectionResetError(errno.ECONNRESET, "no descriptor socket to the host")
        fd = handover.take(channel.channel_id)
        try:
            return _pipe.ShmPipe(channel.shared_memory, fd)
        finally:
            os.close(fd)  # the mapping keeps the memory

    def forget(self, end: ChannelEnd) -> None:
        with self._lock:
            self._channels.pop(end.channel_id, None)

    def listen(
        self, request: hvsock_pb2.Listen, backlog: int
    ) -> tuple[hvsock_pb2.AttachResponse, Listener]:
        """Send Listen; the Listener is registered on the reader thread as the answer arrives
        (before any opening the host accepts on its behalf can be routed)."""
        created: list[Listener] = []

        def register(answer: hvsock_pb2.AttachResponse) -> None:
            if answer.WhichOneof("kind") == "listening":
                listener = Listener(self, answer.listening, backlog)
                with self._lock:
                    self._listeners[listener.listener_id] = listener
                created.append(listener)

        pending = self.send_request(on_answer=register, listen=request)
        pending.done.wait()
        answer = pending.answer
        assert answer is not None
        if answer.WhichOneof("kind") == "error":
            raise errors.from_error(answer.error)
        return answer, created[0]

    def forget_listener(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.pop(listener.listener_id, None)

    # -- lifetime ------------------------------------------------------------------------------

    def socket(self, family: int = 34, type: int = 1, proto: int = 1) -> Any:
        return HvSocket(self, family, type, proto)

    def shutdown(self, timeout: float = 1.0) -> None:
        """Stop as a program asked to stop (SIGTERM) should: stop listening, close every open
        channel as each socket's ``close()`` would (a FIN: the peer reads what was sent, then
        EOF, not a reset), then detach (``close()``).

        ``close()`` alone treats the channels as lost (this end's sockets reset) and leaves the
        host to rescind them when the attach stream ends. Threads still blocked in a call on
        one of these sockets wake when the peer's FIN or the host's rescind arrives. ``timeout``
        bounds the wait for the host to carry the closes out."""
        with self._lock:
            channels = list(self._channels.values())
            listeners = list(self._listeners.values())
        for listener in listeners:
            listener.close()
        for end in channels:
            end.close()
        # A relayed end's close travels on its data stream, not the attach stream: wait for the
        # host to end that stream (it has closed the end then), or it could see the session end
        # first and rescind the channel instead.
        deadline = time.monotonic() + timeout
        for end in channels:
            if isinstance(end.pipe, _pipe.RelayPipe):
                end.pipe.wait_over(max(deadline - time.monotonic(), 0))
        # End the request stream and wait (bounded) for the host to end its answers: the host
        # carries out every request in order first, so the closes above are done (a FIN, not
        # a rescind for a lost partition) before the session is detached. The reader thread
        # must not take the stream's end for a lost host and attach again meanwhile.
        self._stopping = True
        reader = self._reader
        if reader is not None and self._attached.is_set():
            control = self._control
            if control is not None:
                control.shutdown_write()  # the requests' end, behind every one of them
            else:
                self._requests.put(None)
            reader.join(timeout)
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._lost.set()
        with self._lock:
            channels = list(self._channels.values())
            listeners = list(self._listeners.values())
        for end in channels:
            end.connection_lost()
        for listener in listeners:
            listener.reset = True
            listener.notify()
        self._requests.put(None)
        self._drop_link()
        self._channel.close()
        self._drop_handover()

    def __enter__(self) -> Partition:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "host" if getattr(self, "is_host", False) else "vm"
        return f"<Partition {kind} {getattr(self, 'vm_id', '?')} at {self.target}>"


class AttachOutbox:
    """The attach stream's requests, in order, ended by None. Once the host takes batches,
    requests that queued up while the stream sent the last message leave in one message: gRPC's
    stream sends one message at a time and the host reads one per round of its loop, so many
    connects in flight would otherwise go no faster than those rounds."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[hvsock_pb2.AttachRequest | None] = queue.SimpleQueue()
        self.put = self._queue.put
        #: Welcome.request_batches (until the welcome is read, each request goes alone).
        self.batches = False

    def __iter__(self) -> Iterator[hvsock_pb2.AttachRequest]:
        # One consumer (gRPC's request thread): empty() false means get() will not block.
        waiting = self._queue

        def queued() -> bool:
            return not waiting.empty()

        while (request := waiting.get()) is not None:
            if not self.batches:
                yield request
                continue
            message, ended = next_batch(request, queued, waiting.get, _batched)
            yield message
            if ended:
                return


def _batched(requests: list[hvsock_pb2.AttachRequest]) -> hvsock_pb2.AttachRequest:
    return hvsock_pb2.AttachRequest(batch=requests)
