"""Requests that do not decode, and streams that end any way at all, at the gRPC boundary.

grpc.aio decodes each request with the handler's ``FromString`` before our code sees it. A
``DecodeError`` there is the client's mistake, but grpc.aio reports it as an exception of the
servicer: ``UNKNOWN`` for the client and a traceback at ERROR in the log. :class:`RejectMalformed`
wraps every registered handler (HostService, AdminService, health, reflection) once, so bytes
that are not the method's request message end the call with ``INVALID_ARGUMENT`` and an EINVAL
errno detail (through :func:`status.abort`, the one mapping to gRPC):

* a unary request decodes to an :class:`_Undecodable` marker and the call is refused before the
  servicer runs (raising inside the deserializer would reach grpc's own exception handler);
* on a request stream the bad frame raises :class:`MalformedRequest` out of the request
  iterator, inside the servicer, which releases what the stream holds as on any other end and
  lets the exception out; the wrapper turns it into the status.

A servicer may also answer with a response already encoded (``bytes``), which goes out as it
is: SessionData does, its data frames written by hand (``hvsock_common.relaywire``) to save
protobuf's copies of every relayed byte. For the same reason SessionData's requests are decoded
by hand (:data:`HAND_DECODED`, ``relayframes``), into values whose frame data is a view of the
received message; that decoder raises ``DecodeError`` where protobuf would, so a malformed
request ends the call as above.

Response streams are written here with ``context.write`` and the servicer's async generator is
closed explicitly (``aclose``) however the call ends. Left to grpc.aio, a generator suspended at
a ``yield`` when the client cancels (or its deadline passes, or its connection breaks) is only
finalized when the garbage collector gets to it, and what it holds (an attach session, a relay's
worker threads and ring mapping) would stay until then.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from . import relayframes
from .core import errors
from .status import abort

#: Methods whose requests are decoded by hand instead of by the generated message's parser.
HAND_DECODED: dict[str, Callable[[bytes], Any]] = {
    relayframes.SESSION_DATA: relayframes.decode_session_data,
}


class MalformedRequest(errors.InvalidArgument):
    """A request (or a frame of a request stream) is not the message the method takes."""


@dataclass(frozen=True)
class _Undecodable:
    """What a unary request that failed to decode becomes (checked before the servicer)."""

    error: MalformedRequest


def _decoder(deserializer: Callable[[bytes], Any], streaming: bool) -> Callable[[bytes], Any]:
    def decode(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except DecodeError as exc:
            error = MalformedRequest(f"malformed request: {exc}")
            if streaming:
                raise error from None
            return _Undecodable(error)

    return decode


async def _write_all(
    result: AsyncIterator[Any] | Awaitable[None] | None, context: grpc.aio.ServicerContext
) -> None:
    """Send what a response-streaming servicer produces; close its generator however we end."""
    if inspect.isasyncgen(result):
        async with contextlib.aclosing(result) as responses:
            async for response in responses:
                await context.write(response)
    elif inspect.isawaitable(result):
        await result  # a servicer using context.write() itself


def _encoder(serializer: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    def encode(response: Any) -> bytes:
        return response if type(response) is bytes else serializer(response)

    return encode


def _wrap(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    if handler.request_deserializer is None:
        return handler
    if handler.response_serializer is not None:
        handler = handler._replace(response_serializer=_encoder(handler.response_serializer))
    deserializer = HAND_DECODED.get(method, handler.request_deserializer)
    decode = _decoder(deserializer, handler.request_streaming)
    if not handler.request_streaming and not handler.response_streaming:
        unary_unary = handler.unary_unary

        async def unary_unary_call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                await abort(context, request.error)
            return await unary_unary(request, context)

        return handler._replace(request_deserializer=decode, unary_unary=unary_unary_call)
    if not handler.request_streaming:
        unary_stream = handler.unary_stream

        async def unary_stream_call(request: Any, context: grpc.aio.ServicerContext) -> None:
            if isinstance(request, _Undecodable):
                await abort(context, request.error)
            await _write_all(unary_stream(request, context), context)

        return handler._replace(request_deserializer=decode, unary_stream=unary_stream_call)
    if not handler.response_streaming:
        stream_unary = handler.stream_unary

        async def stream_unary_call(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await stream_unary(requests, context)
            except MalformedRequest as err:
                await abort(context, err)

        return handler._replace(request_deserializer=decode, stream_unary=stream_unary_call)
    stream_stream = handler.stream_stream

    async def stream_stream_call(requests: Any, context: grpc.aio.ServicerContext) -> None:
        try:
            await _write_all(stream_stream(requests, context), context)
        except MalformedRequest as err:
            await abort(context, err)

    return handler._replace(request_deserializer=decode, stream_stream=stream_stream_call)


class RejectMalformed(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # untyped in grpc
    """Wraps every handler the server resolves (once per method) as described above."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # an unknown method: grpc answers UNIMPLEMENTED
        method = handler_call_details.method
        # Only registered methods get here, so the cache is as small as the API.
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = self._wrapped[method] = (handler, _wrap(handler, method))
        return cached[1]
