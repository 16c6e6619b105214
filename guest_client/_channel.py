"""One open channel's end and one listening address, as a partition holds them.

They sit below :mod:`._partition` and :mod:`._socket` (both use them) and refer to their
partition only through the few calls below (``notify``, ``forget``, ``forget_listener``).
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from hvsock.v1 import hvsock_pb2

from . import _pipe

if TYPE_CHECKING:
    from ._partition import Partition

#: The API's data paths by their names (sockets, ``hvsock channels``, the testbed).
DATA_PATH_NAMES = {
    hvsock_pb2.DATA_PATH_SHARED_MEMORY: "shm",
    hvsock_pb2.DATA_PATH_GRPC_RELAY: "relay",
}

#: Longest wait, at a rescinded EOF, for the notice (or the lost host) that explains it.
_SETTLE_TIMEOUT = 1.0


class ChannelEnd:
    """This partition's end of one open channel: its pipe and what the host said about it."""

    def __init__(self, partition: Partition, channel: hvsock_pb2.Channel, pipe: _pipe.Pipe) -> None:
        self.partition = partition
        self.channel = channel
        self.channel_id = channel.channel_id
        self.pipe = pipe
        self.rescinded = False
        self.reset = False
        self.closed = False
        #: Set once this partition knows why the channel ended (a rescind notice, or the host
        #: lost). Shared rings can be rescinded first by the other end's partition, which may
        #: notice a lost host before this one does.
        self.settled = threading.Event()

    def on_notice(self, notice: hvsock_pb2.ChannelNotice) -> None:
        if notice.kind == hvsock_pb2.ChannelNotice.KIND_RESCINDED:
            self.rescinded = True
            self.pipe.rescind()  # wakes every waiter; reads drain then EOF, sends fail
            self.settled.set()

    def connection_lost(self) -> None:
        """The host went away: the channel is gone (ECONNRESET for the program)."""
        self.reset = True
        self.rescinded = True
        self.settled.set()
        self.pipe.rescind()

    def ended_by_reset(self) -> bool:
        """At EOF: whether the end is a reset rather than a FIN or a host rescind. A rescinded
        ring whose cause this partition has not heard of yet waits (bounded) to hear it."""
        pipe = self.pipe
        if (
            not self.reset
            and not self.settled.is_set()
            # Either ring (a failed send sees its own), or a relay stream the host ended.
            and (pipe.rx.is_rescinded or pipe.tx.is_rescinded or pipe.ended_by_host)
        ):
            self.settled.wait(_SETTLE_TIMEOUT)
        return self.reset

    def shutdown_write(self) -> None:
        """SHUT_WR: a FIN into the send ring (it always fits), and the host is told.

        On the relay path the FIN travels in order behind the data on the ChannelData stream
        and the host records it when it has written it into the ring; a separate Shutdown on
        the attach stream could overtake data still in flight.
        """
        with contextlib.suppress(OSError):  # already rescinded: nothing to shut
            self.pipe.tx.fin(0)
        if self.pipe.path != "relay" and not self.reset:
            self.partition.notify(shutdown=hvsock_pb2.Shutdown(channel_id=self.channel_id))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.partition.forget(self)
        if self.reset:
            self.pipe.close()
            return
        with contextlib.suppress(OSError):
            if not self.pipe.tx.fin_sent:
                self.pipe.tx.fin(0)
        if self.pipe.path == "relay":
            # The relay stream carries the rest of the data, then FIN, then ends: the host
            # closes this end once it has written all of it into the ring.
            self.pipe.close()
            return
        self.partition.notify(close=hvsock_pb2.Close(channel_id=self.channel_id))
        with contextlib.suppress(OSError):  # EBUSY: another thread still blocked in a call
            self.pipe.close()


class Listener:
    """A listening address: the accepted channels waiting for ``accept()``."""

    def __init__(self, partition: Partition, listening: hvsock_pb2.Listening, backlog: int) -> None:
        self.partition = partition
        self.listener_id = listening.listener_id
        self.address = listening.address
        self.backlog = max(backlog, 1)
        #: The relay window of the connections it accepts (None: the host's default).
        self.relay_window: int | None = None
        self.ready: collections.deque[ChannelEnd] = collections.deque()
        self.accepting = 0  # offers accepted whose opening has not arrived yet
        self.changed = threading.Condition()
        self.closed = False
        self.reset = False
        #: accept() has raised the reset once: readiness stops reporting it, so an event loop
        #: does not wake again and again for a listener that will never accept.
        self.reset_reported = False
        self.watchers: list[Callable[[], None]] = []
        self._credit_lock = threading.Lock()
        self._credit_step = max(self.backlog // 4, 1)
        self._unreturned = 0  # accepted, auto-accept credit not yet given back

    def has_room(self) -> bool:
        return len(self.ready) + self.accepting < self.backlog

    def accepted(self) -> None:
        """The program took a connection: the host may open one more on our behalf.

        Credit goes back in steps of a quarter of the backlog, not one message per accept
        (every message costs the host's event loop, which is what a connect waits behind).
        Credit held back only makes the host offer instead of accepting on our behalf; it
        never lets more than ``backlog`` connections wait."""
        with self._credit_lock:
            self._unreturned += 1
            count = self._unreturned
            if count < self._credit_step:
                return
            self._unreturned = 0
        self.partition.notify(
            accept_credit=hvsock_pb2.AcceptCredit(listener_id=self.listener_id, count=count)
        )

    def notify(self) -> None:
        with self.changed:
            self.changed.notify_all()
        for watcher in list(self.watchers):
            watcher()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.partition.forget_listener(self)
        if not self.reset:
            self.partition.notify(unlisten=hvsock_pb2.Unlisten(listener_id=self.listener_id))
        while self.ready:
            self.ready.popleft().close()
        self.notify()
