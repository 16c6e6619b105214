"""asyncio streams over emulated hv sockets, with asyncio's own semantics.

This is not a second implementation: an :class:`~guest_client.HvSocket` has a ``fileno()``
whose readiness mirrors the channel, so asyncio's selector transports drive it exactly as they
drive a kernel socket (``loop.create_connection(sock=...)``, ``loop.create_server(sock=...)``).
Only connect and attach, which wait on the host service, run in the default executor.

    reader, writer = await aio.open_connection((hv.HV_GUID_PARENT, service_id), partition=vm)
    server = await aio.start_server(handle, (hv.HV_GUID_WILDCARD, service_id), partition=host)
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

from . import Partition
from . import attach as _attach
from . import attach_host as _attach_host
from ._socket import HvSocket

__all__ = ["attach", "attach_host", "open_connection", "start_server"]

_ClientConnected = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None]


async def attach(*args: Any, **kwargs: Any) -> Partition:
    """:func:`guest_client.attach` without blocking the event loop."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, functools.partial(_attach, *args, **kwargs))


async def attach_host(*args: Any, **kwargs: Any) -> Partition:
    """:func:`guest_client.attach_host` without blocking the event loop."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, functools.partial(_attach_host, *args, **kwargs))


def _partition(partition: Partition | None) -> Partition:
    if partition is not None:
        return partition
    from . import socket as default_socket

    probe = default_socket()  # attaches the default partition from the environment
    probe.close()
    return probe.partition


async def open_connection(
    address: tuple[Any, Any],
    *,
    partition: Partition | None = None,
    family: int | None = None,
    limit: int = 2**16,
    **kwargs: Any,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to ``address`` and return asyncio streams (as ``asyncio.open_connection``)."""
    loop = asyncio.get_running_loop()
    owner = _partition(partition)
    sock: HvSocket = owner.socket() if family is None else owner.socket(family)
    try:
        await loop.run_in_executor(None, sock.connect, address)
        sock.setblocking(False)
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport, _ = await loop.create_connection(lambda: protocol, sock=sock, **kwargs)  # type: ignore[call-overload]  # duck-typed socket
    except BaseException:
        sock.close()
        raise
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


async def start_server(
    client_connected_cb: _ClientConnected,
    address: tuple[Any, Any],
    *,
    partition: Partition | None = None,
    family: int | None = None,
    backlog: int = 100,
    limit: int = 2**16,
    **kwargs: Any,
) -> asyncio.Server:
    """Listen on ``address`` and call ``client_connected_cb(reader, writer)`` per connection
    (as ``asyncio.start_server``)."""
    loop = asyncio.get_running_loop()
    owner = _partition(partition)
    sock: HvSocket = owner.socket() if family is None else owner.socket(family)
    try:
        sock.bind(address)
        await loop.run_in_executor(None, sock.listen, backlog)
        sock.setblocking(False)

        def factory() -> asyncio.StreamReaderProtocol:
            reader = asyncio.StreamReader(limit=limit, loop=loop)
            return asyncio.StreamReaderProtocol(reader, client_connected_cb, loop=loop)

        server: asyncio.Server = await loop.create_server(  # type: ignore[call-overload]
            factory, sock=sock, backlog=backlog, **kwargs
        )  # (a duck-typed socket)
        return server
    except BaseException:
        sock.close()
        raise
