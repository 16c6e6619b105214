"""Readiness (the fileno() behind select/asyncio) against the rings it watches."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import select
import threading
import time

import pytest

from guest_client.testing import socketpair

pytestmark = pytest.mark.unit


def test_readiness_probes_never_corrupt_the_rings_of_a_busy_stream() -> None:
    """Readiness computes its bits on its watcher threads while the event loop sends and
    receives. It used to ask the rings for readable()/writable(), which compare an end's own
    index with the shared copy: from a thread other than the one moving that index, a publish
    seen half done looked like "own index changed behind our back", and the ring was marked
    corrupt for both ends (test_aio's shm echo failed about 1 run in 15).

    An asyncio stream of 8-byte packets (many publishes to land on), with one more thread
    recomputing both ends' bits as fast as it can, as the watchers do on every wake-up.
    """
    sender, receiver = socketpair(max_payload=8)
    data = bytes(range(256)) * 4096  # 1 MiB: 128 Ki packets
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            for sock in (sender, receiver):
                readiness = sock._readiness
                if readiness is not None:
                    readiness.update()

    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        reader, receiving = await asyncio.open_connection(sock=receiver)  # type: ignore[arg-type]
        _, writer = await asyncio.open_connection(sock=sender)  # type: ignore[arg-type]
        prober = loop.run_in_executor(None, probe)
        try:

            async def send() -> None:
                writer.write(data)
                await writer.drain()
                writer.write_eof()

            sending = asyncio.create_task(send())
            received = await reader.read(-1)
            await sending
        finally:
            done.set()
            await prober
            for stream in (writer, receiving):
                stream.close()
                with contextlib.suppress(OSError):
                    await stream.wait_closed()
        return received

    try:
        received = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        sender.close()
        receiver.close()
    assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()


def _writable(sock: object) -> bool:
    return bool(select.select([], [sock], [], 0)[1])


def _until(condition: object, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "the bits never followed"
        time.sleep(0.01)


def test_bits_follow_a_call_blocked_in_the_end() -> None:
    """A sendall blocked inside the end consumes the room the bits last showed without
    returning to update(): room a reader freed, or credit the host granted, taken at once
    while a watcher was showing it. Nothing wakes a watcher for that (the end never became
    ready again), so the watchers look again every slice; before they did, select said
    "writable" until the sendall returned (a relayed sender in tests/faults waited 30 s).
    Forced here: the bits computed as if the room were still there, the call blocked."""
    sender, receiver = socketpair()
    data = b"x" * (1 << 20)  # far more than the rings hold: the sendall blocks
    sender.fileno()  # readiness and its watchers
    sending = threading.Thread(target=sender.sendall, args=(data,), daemon=True)
    sending.start()
    _until(lambda: not _writable(sender))
    readiness = sender._readiness
    assert readiness is not None
    real = readiness._state
    readiness._state = lambda: (real()[0], True)  # the room, as last seen
    readiness.update()
    readiness._state = real
    assert _writable(sender) and sending.is_alive()
    _until(lambda: not _writable(sender))
    # Drain, so the sendall completes and everything closes cleanly.
    buffer, received = bytearray(65536), 0
    while received < len(data):
        received += receiver.recv_into(buffer)
    sending.join(10)
    assert not sending.is_alive()
    sender.close()
    receiver.close()
