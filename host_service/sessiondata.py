"""The SessionData stream of one attach session, and the ring pumps of its relayed ends.

One :class:`SessionData` per attach session owns the session's relayed channel ends
(:class:`RingRelay`), the pure rules of its stream (``core.relay.RelaySession``: windows and
frame validation) and, while the client has it open, the stream itself. The servicer
(:meth:`SessionData.serve`) only translates: each request's frames go through the pure
session, whose effects are carried out here; what the ends produce is batched into responses.

Threads. Ring waits block on futexes, which asyncio cannot await, so each relayed end
(``ringrelay.RingRelay``) has two pumps that run on pooled worker threads while they have
work and park (no thread) in a ring watcher when they have none: a writer (client data -> the
ring toward the peer) and a reader (the ring from the peer -> the client, within the client's
credit); see ``ringrelay`` for their life cycle. Pumps never touch the pure session or the
stream: they post to the event loop through :meth:`SessionData.post`, which batches every post
made before the loop gets to them into one ``call_soon_threadsafe``. Everything else runs on
the event loop.

Windows (see ``core.relay``): the client's send limit is ``delivered + ring room + window``,
computed on the loop whenever the writer reports bytes written into the ring (or, when the
client is at its limit with nothing held, once the ring has a quarter of itself free). The
reader never reads beyond the client's credit, and at most ``MAX_UNSENT`` bytes of an end wait
for the stream at once, so a client that stops reading its stream stops the reader (and the
peer, once the ring is full), never grows host memory.

Forwarded ends. When both ends of a channel are relayed there is no ring and no pump: the
data plane registers a ``forward.ForwardEnd`` in ``relays`` instead, which takes the same
calls (push, credit, written_out, stop) and puts its peer's frames on this stream itself
(:meth:`SessionData.queue_frame` and the few calls next to it).

Teardown. An end is *finished* exactly once (:meth:`SessionData._finish`): its last frame
(peer FIN is not last; ``reset`` or ``close_done`` is) goes out, the pure session forgets it
and its pumps are told to stop. The mapping of its rings is released by whichever of the
pumps and :meth:`RingRelay.stop` comes last (``RingRelay._alive``), so no thread is ever inside
a ring, nor a watch armed on it, when it is unmapped; a pump parked in the watcher is started
by ``stop`` cancelling its watch, and ends.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

from hvsock.v1 import hvsock_pb2
from hvsock_common.relaywire import RESPONSE_FRAMES, FrameWriter, Request
from ring import RingCorruptError, shm

from .core import errors
from .core.relay import (
    ClientClosed,
    ClientCredit,
    ClientData,
    ClientFin,
    RelayBudget,
    RelaySession,
    ResetEnd,
)
from .core.types import Side
from .ringrelay import (
    _CLOSE,
    _CLOSED,
    _CORRUPT,
    _DATA,
    _FIN,
    _FIN_WRITTEN,
    _READER_EOF,
    _ROOM,
    _WRITTEN,
    MAX_UNSENT,
    RingRelay,
)
from .status import error_message

__all__ = ["MAX_RESPONSE_DATA", "DataFrame", "RingRelay", "SessionData", "is_close", "is_fin"]

if TYPE_CHECKING:
    from .forward import ForwardEnd

#: A relayed end of this session: on a ring of the host's, or forwarded to its peer's stream
#: (both ends relayed, ``forward``). Both take push, credit, written_out and stop.
RelayedEnd: TypeAlias = "RingRelay | ForwardEnd"

log = logging.getLogger("hvsock.host.relay")

#: Data bytes in one response, at most: a response is one gRPC message, and clients (like the
#: host) take messages of up to 1 MiB; this leaves room for the frames' own fields.
MAX_RESPONSE_DATA = 1_000_000


class DataFrame(NamedTuple):
    """A data frame waiting for the stream: built into its response only when that is made,
    so its bytes are copied into a message once, not twice (a frame, then the response)."""

    channel_id: int
    end: int
    data: bytes | memoryview


def is_fin(item: object) -> bool:
    """Whether ``item``, pushed to a relayed end, is the client's FIN (for other end kinds)."""
    return item is _FIN


def is_close(item: object) -> bool:
    """Whether ``item``, pushed to a relayed end, is the client's close."""
    return item is _CLOSE


class SessionData:
    """One attach session's relayed ends and its SessionData stream (all on the event loop,
    but :meth:`post`)."""

    def __init__(
        self,
        session_id: int,
        *,
        on_fin: Callable[[int, Side], None],
        on_close: Callable[[int, Side], None],
        on_abort: Callable[[int, str], None],
        budget: RelayBudget | None = None,
    ) -> None:
        self.session_id = session_id
        self.rules = RelaySession(budget)
        #: (channel id, end) -> the relayed end (the same keys as ``rules``).
        self.relays: dict[tuple[int, int], RelayedEnd] = {}
        #: Tell the core: the end sent FIN / closed (once it is in the ring), or must be torn
        #: down (rescinded: a protocol error, a corrupt ring, the stream gone).
        self._on_fin, self._on_close, self._on_abort = on_fin, on_close, on_abort
        self._loop = asyncio.get_running_loop()
        self._inbox: list[tuple[str, RingRelay, Any]] = []
        self._inbox_lock = threading.Lock()
        self._scheduled = False
        # The stream, while open: frames waiting to go out, and the loop's wake-up for them.
        self.streaming = False
        #: The open stream's client holds frames for ends it has not seen open yet
        #: (SessionDataRequest.early_frames): ends opening now are credited at once.
        self.credits_new_ends = False
        self._out: collections.deque[
            tuple[hvsock_pb2.RelayFrame | DataFrame, RelayedEnd | None]
        ] = collections.deque()
        self._out_data = 0
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self.ended: str | None = None  # the session is over: the stream ends UNAVAILABLE

    # -- ends ------------------------------------------------------------------------------

    def open_end(
        self,
        end: shm.Channel,
        side: Side,
        vm_id: str,
        channel_id: int,
        window: int,
        reserved: int | None = None,
        receive_credit: int = 0,
    ) -> tuple[RingRelay, int]:
        """Register this session's relayed end of ``channel_id``; returns it and its first
        send limit (what the peer's empty ring takes plus the window the budget gives it;
        ``reserved``: what it gave already). ``receive_credit``: its first credit, when it
        opens credited (the data plane's stall gates start its reader)."""
        index = 0 if side is Side.CONNECTOR else 1
        rules = self.rules.open_end(
            channel_id, index, window, end.tx.writable(), reserved, receive_credit
        )
        relay = RingRelay(
            end, side, vm_id, self.session_id, channel_id, self, rules.told, receive_credit
        )
        self.relays[relay.key] = relay
        return relay, rules.told

    def rescinded(self, relay: RingRelay, reason: str) -> None:
        """The host rescinded the channel (its rings are rescinded): the end finishes with a
        reset once its reader has passed what was in the ring."""
        if relay.finished:
            return
        relay.reset = relay.reset or reason
        self._finish_when_drained(relay)

    def _finish_when_drained(self, relay: RingRelay) -> None:
        """Finish a rescinded (or corrupt) end with its reset now if nothing more can reach
        the client; otherwise its reader's EOF will. An end whose client has not granted yet
        keeps what its ring holds for that first credit (the channel may be over, both ends
        having sent FIN, with the data sent before them unread): its reader starts then."""
        if relay.reader_eof or not self.streaming:
            self._finish_reset(relay)
            return
        if relay._reader:
            with relay._lock:
                if not relay._parked:
                    return  # the reader runs: its EOF finishes the end
            # All the reader read is posted: take those posts first (they go out before the
            # reset).
            self._take_posts()
            if relay.finished:
                return
        # No reader runs, nor will before the client grants (on the loop): the ring is ours to
        # look at from here. What it still holds waits for that credit.
        if not _holds_data(relay.end.rx):
            self._finish_reset(relay)

    def _finish_reset(self, relay: RingRelay) -> None:
        if relay.corrupt is not None and relay.corrupt[0]:
            self._finish(relay, _reset(errors.RingCorrupt(relay.corrupt[1])))
        else:
            reason = relay.reset or (relay.corrupt[1] if relay.corrupt else "rescinded")
            self._finish(
                relay,
                _reset(
                    errors.ConnectionReset(f"channel {relay.channel_id} was rescinded: {reason}")
                ),
            )

    def _finish(self, relay: RelayedEnd, last: hvsock_pb2.RelayFrame | None) -> None:
        """The end is over: its last frame goes out, the rules forget it, its pumps stop."""
        if relay.finished:
            return
        relay.finished = True
        if last is not None:
            last.channel_id, last.end = relay.key
            self._send(last)
        self.rules.end(*relay.key)
        self.relays.pop(relay.key, None)
        relay.stop()

    # -- pumps -> loop ---------------------------------------------------------------------

    def call_soon(self, callback: Callable[[], object]) -> bool:
        """From a pump or the watcher: run ``callback`` on the loop; False if the loop is gone
        (the server is stopping)."""
        try:
            self._loop.call_soon_threadsafe(callback)
        except RuntimeError:
            return False
        return True

    def post(self, kind: str, relay: RingRelay, value: Any) -> None:
        """From a pump: hand ``kind`` to the loop (batched: one wake-up for every post made
        before the loop gets to them)."""
        with self._inbox_lock:
            self._inbox.append((kind, relay, value))
            if self._scheduled:
                return
            self._scheduled = True
        self.call_soon(self._take_posts)  # False: the loop is gone, the server is stopping

    def _take_posts(self) -> None:
        with self._inbox_lock:
            posts, self._inbox = self._inbox, []
            self._scheduled = False
        for kind, relay, value in posts:
            if relay.finished:
                continue
            try:
                self._on_post(kind, relay, value)
            except Exception:  # one end's trouble must not cost the others their posts
                log.exception("relay post %s on channel %d", kind, relay.channel_id)

    def _on_post(self, kind: str, relay: RingRelay, value: Any) -> None:
        channel_id, index = relay.key
        if kind == _DATA:
            self.rules.sent(channel_id, index, len(value))
            self._send(DataFrame(channel_id, index, value), relay)
        elif kind in (_WRITTEN, _ROOM):
            delivered, room = value
            limit = self.rules.grant(channel_id, index, delivered, room)
            if limit is not None:
                relay.tell(limit)
                self._send(hvsock_pb2.RelayFrame(channel_id=channel_id, end=index, credit=limit))
        elif kind == _FIN_WRITTEN:
            self._on_fin(channel_id, relay.side)
        elif kind == _CLOSED:
            # Finished before the core hears of it: closing may rescind the channel at once
            # (the peer closed first), and this end is owed close_done, not a reset.
            self._finish(relay, hvsock_pb2.RelayFrame(close_done=True))
            self._on_close(channel_id, relay.side)
        elif kind == _READER_EOF:
            relay.reader_eof = True
            if relay.end.rx.is_rescinded or relay.reset is not None:
                if relay.reset is None and relay.corrupt is None:
                    # Rescinded in the memory, not by the host (a peer mapping the rings
                    # wrote the flag): the channel is torn down for both ends.
                    self._on_abort(channel_id, "ring rescinded by the peer")
                self._finish_reset(relay)
            else:
                self._send(hvsock_pb2.RelayFrame(channel_id=channel_id, end=index, fin=True))
        elif kind == _CORRUPT:
            relay.corrupt = value
            if value[0]:
                self._finish_reset(relay)  # the reader stopped at the corruption
            else:
                self._finish_when_drained(relay)
            self._on_abort(channel_id, value[1])

    # -- what forwarded ends (forward.ForwardEnd) need of their session ----------------------

    def queue_frame(
        self, frame: hvsock_pb2.RelayFrame | DataFrame, end: RelayedEnd | None = None
    ) -> None:
        """Queue ``frame`` for the stream (``end``: the end whose data it carries, told when
        it is written out)."""
        self._send(frame, end)

    def finish(self, end: RelayedEnd, last: hvsock_pb2.RelayFrame | None) -> None:
        self._finish(end, last)

    def tell_fin(self, channel_id: int, side: Side) -> None:
        self._on_fin(channel_id, side)

    def tell_closed(self, channel_id: int, side: Side) -> None:
        self._on_close(channel_id, side)

    # -- the stream ----------------------------------------------------------------------

    def _send(
        self, frame: hvsock_pb2.RelayFrame | DataFrame, relay: RelayedEnd | None = None
    ) -> None:
        if not self.streaming:
            return
        self._out.append((frame, relay))
        self._out_data += len(frame.data)
        if self._out_data >= MAX_UNSENT:
            self._drained.clear()
        self._wake.set()

    def _apply(self, request: Request) -> None:
        """Carry out one request's frames (on the loop)."""
        rules, relays = self.rules, self.relays
        for frame in request.frames:
            effects = rules.receive(
                frame.channel_id,
                frame.end,
                data=frame.data,
                fin=frame.fin,
                credit=frame.credit,
                close=frame.close,
                reset=frame.reset is not None or frame.close_done,
            )
            for effect in effects:
                if isinstance(effect, ClientData):
                    relays[(effect.channel_id, effect.end)].push(effect.data)
                elif isinstance(effect, ClientCredit):
                    relays[(effect.channel_id, effect.end)].credit(effect.limit)
                elif isinstance(effect, ClientFin):
                    relays[(effect.channel_id, effect.end)].push(_FIN)
                elif isinstance(effect, ClientClosed):
                    relays[(effect.channel_id, effect.end)].push(_CLOSE)
                elif isinstance(effect, ResetEnd):
                    self._reject(effect)

    def _reject(self, effect: ResetEnd) -> None:
        """A frame broke the rules: that end (only) is reset, and its channel rescinded."""
        frame = _reset(effect.error)
        frame.channel_id, frame.end = effect.channel_id, effect.end
        self._send(frame)
        relay = self.relays.pop((effect.channel_id, effect.end), None)
        if relay is not None:  # the rules forgot it already
            relay.finished = True
            relay.stop()
            self._on_abort(effect.channel_id, f"protocol error: {effect.error}")

    def open_stream(self) -> None:
        """A SessionData stream starts for this session (one at a time)."""
        if self.streaming:
            raise errors.InvalidState(
                f"session {self.session_id} has a SessionData stream open already"
            )
        self.streaming = True
        self._wake.clear()

    async def serve(
        self,
        first: Request,
        requests: AsyncIterator[Request],
    ) -> AsyncGenerator[bytes, None]:
        """The stream's responses (after :meth:`open_stream`), reading ``requests``
        meanwhile; every relayed end still open when the stream ends (however it ends) is
        torn down."""
        self.credits_new_ends = first.early_frames
        reader = asyncio.create_task(self._read(first, requests))
        reader.add_done_callback(lambda _: self._wake.set())
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._out:
                    yield self._batch()
                if reader.done() or self.ended is not None:
                    break
            if reader.done() and not reader.cancelled() and (error := reader.exception()):
                raise error  # a malformed request, or a rule of the stream broken
        finally:
            self.streaming = self.credits_new_ends = False
            reader.cancel()
            # Its exception, if any, was raised above (or the stream ended some other way
            # first): the ends must be torn down whatever it was.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            self._out.clear()
            self._out_data = 0
            self._drained.set()
            for relay in list(self.relays.values()):
                self._finish(relay, None)
                self._on_abort(relay.channel_id, "the session's data stream ended")

    def _batch(self) -> bytes:
        """The next response, encoded (hvsock_common.relaywire: the data is copied once)."""
        frames = FrameWriter(RESPONSE_FRAMES)
        out = self._out
        while out and (
            frames.data_bytes + len(out[0][0].data) <= MAX_RESPONSE_DATA or not frames.count
        ):
            frame, relay = out.popleft()
            if isinstance(frame, DataFrame):
                frames.add(frame.channel_id, frame.end, data=frame.data)
            else:
                frames.add_encoded(frame.SerializeToString())
            n = len(frame.data)
            if relay is not None and n:
                relay.written_out(n)
        # Data only ever travels in DataFrames: the writer counted all of it.
        self._out_data -= frames.data_bytes
        if self._out_data < MAX_UNSENT:
            self._drained.set()
        return frames.message()

    async def _read(
        self,
        first: Request,
        requests: AsyncIterator[Request],
    ) -> None:
        self._apply(first)
        await self._drained.wait()
        async for request in requests:
            if request.session:
                raise errors.InvalidArgument("session is only in the first request")
            self._apply(request)
            # A client that stops reading its stream stops being read (its frames would only
            # queue answers it does not take).
            await self._drained.wait()

    def end(self, reason: str) -> None:
        """The attach session is over: end the stream (UNAVAILABLE)."""
        self.ended = reason
        self._wake.set()


def _holds_data(rx: Any) -> bool:
    """Whether a ring nobody reads now holds anything to read (False when it cannot be read:
    corrupt, or unmapped)."""
    try:
        return bool(rx.readable())
    except (RingCorruptError, OSError):
        return False


def _reset(error: errors.HvError) -> hvsock_pb2.RelayFrame:
    """A frame ending an end with ``error`` (its channel and end filled in by the caller)."""
    return hvsock_pb2.RelayFrame(reset=error_message(error))
