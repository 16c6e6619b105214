"""Readiness (the fileno() behind select/asyncio) against the rings it watches."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading

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
