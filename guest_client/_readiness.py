"""A file descriptor whose readiness mirrors an emulated socket, for select/poll/asyncio.

It is one end of a private Unix socketpair. Readable is made true by queueing a byte into it
and false by draining it; writable is made false by filling the other end's receive buffer
and true by draining that. Two watcher threads (started only once ``fileno()`` is asked for)
sleep on the rings and flip the bits when data or space arrives; the socket's own calls flip
them back after they consume data or space, through :meth:`Readiness.update`.

Invariant: the bits shown equal ``state()`` after every ``update()``; a watcher waits for a
transition to "ready", so a bit can lag by at most one watcher wake-up, and each watcher also
updates at least every ``_WATCH_SLICE``. That bounds the one lag no wake-up reports: a call
blocked inside the end consumes what made it ready without returning to ``update()`` (a
``sendall`` that takes room a reader freed, or credit the host granted, and waits again, after
a watcher showed the room), so without the slice the bits would say "writable" until that call
returned, possibly never.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable

from ._channel import ChannelEnd, Listener

#: How often a watcher looks at the closed flag while nothing happens on its ring.
_WATCH_SLICE = 0.25


class Readiness:
    def __init__(self) -> None:
        self._user, self._ctl = socket.socketpair()
        for sock in (self._user, self._ctl):
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # the kernel's minimum
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        self._lock = threading.Lock()
        self._readable = False
        self._writable = True
        self._state: Callable[[], tuple[bool, bool]] = lambda: (False, True)
        self._closed = False
        self._drained = threading.Event()
        self._full = threading.Event()
        self._threads: list[threading.Thread] = []

    def fileno(self) -> int:
        return self._user.fileno()

    # -- sources -----------------------------------------------------------------------------

    def watch_end(self, end: ChannelEnd) -> None:
        pipe = end.pipe
        rx, tx = pipe.rx, pipe.tx

        def state() -> tuple[bool, bool]:
            if end.closed:
                return True, True
            try:
                # Data or space behind a host stall is not ready: the call would wait.
                # This runs on the watcher threads too, concurrently with the socket's own
                # reads and writes, so it asks as an observer (watch_*): the ends' own calls
                # (readable()/writable(), wait_*) check or set words that only the thread
                # reading (writing) may touch — from another thread a publish seen half done
                # looks like corruption, and a wait there can take a blocked end's wake-up.
                readable = (
                    rx.at_eof
                    or rx.is_rescinded
                    or end.reset
                    or (rx.watch_readable(0) and pipe.wait_unstalled(True, 0))
                )
                writable = (
                    tx.fin_sent
                    or tx.is_rescinded
                    or end.reset
                    or (tx.watch_writable(0) and pipe.wait_unstalled(False, 0))
                )
            except OSError:  # corrupt: let the next call raise it
                return True, True
            return readable, writable

        self._state = state
        self._start(
            lambda: pipe.wait_unstalled(True, _WATCH_SLICE) and rx.watch_readable(_WATCH_SLICE),
            self._drained,
        )
        self._start(
            lambda: pipe.wait_unstalled(False, _WATCH_SLICE) and tx.watch_writable(_WATCH_SLICE),
            self._full,
        )
        self.update()

    def watch_listener(self, listener: Listener) -> None:
        self._state = lambda: (
            bool(listener.ready)
            or listener.closed
            or (listener.reset and not listener.reset_reported),
            False,
        )
        listener.watchers.append(self.update)
        self.update()

    def _start(self, wait: Callable[[], bool], rearm: threading.Event) -> None:
        def run() -> None:
            while not self._closed:
                try:
                    ready = wait()
                except OSError:
                    ready = True
                self.update()  # also when the slice ran out: see the invariant above
                if not ready:
                    continue
                # Wait until what made it ready is consumed (update() says so), then wait again.
                while not self._closed and not rearm.wait(_WATCH_SLICE):
                    self.update()
                rearm.clear()

        thread = threading.Thread(target=run, name="hvsock-readiness", daemon=True)
        self._threads.append(thread)
        thread.start()

    # -- bits --------------------------------------------------------------------------------

    def update(self) -> None:
        if self._closed:
            return
        readable, writable = self._state()
        with self._lock:
            if readable != self._readable:
                if readable:
                    self._ctl.send(b"r")
                else:
                    _drain(self._user)
                self._readable = readable
            if writable != self._writable:
                if writable:
                    _drain(self._ctl)
                else:
                    with contextlib.suppress(BlockingIOError):
                        while True:
                            self._user.send(b"\0" * 4096)
                self._writable = writable
        if not readable:
            self._drained.set()
        if not writable:
            self._full.set()

    def close(self) -> None:
        self._closed = True
        self._drained.set()
        self._full.set()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()
        self._user.close()
        self._ctl.close()


def _drain(sock: socket.socket) -> None:
    with contextlib.suppress(BlockingIOError):
        while sock.recv(65536):
            pass
