"""guest_client.aio: asyncio streams on every host transport."""

from __future__ import annotations

import asyncio
import hashlib
import random

import pytest

import guest_client as hv
from guest_client import aio

from .conftest import Env

pytestmark = pytest.mark.integration


def test_stream_echo(host_env: Env) -> None:
    root, vm = host_env.root(), host_env.vm()
    service = host_env.service()
    data = random.Random(7).randbytes(2 << 20)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        writer.close()
        await writer.wait_closed()

    async def main() -> bytes:
        server = await aio.start_server(handle, (hv.HV_GUID_WILDCARD, service), partition=root)
        async with server:
            reader, writer = await aio.open_connection((hv.HV_GUID_PARENT, service), partition=vm)
            assert writer.get_extra_info("peername") == (hv.HV_GUID_PARENT.lower(), service)

            async def send() -> None:
                writer.write(data)
                await writer.drain()
                writer.write_eof()

            sender = asyncio.create_task(send())
            echoed = await reader.read(-1)
            await sender
            writer.close()
            await writer.wait_closed()
            return echoed

    echoed = asyncio.run(asyncio.wait_for(main(), 60))
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(data).digest()


def test_refused_connect_raises(host_env: Env) -> None:
    vm = host_env.vm("windows")

    async def main() -> None:
        await aio.open_connection((hv.HV_GUID_PARENT, host_env.service()), partition=vm)

    with pytest.raises(ConnectionRefusedError):
        asyncio.run(main())
