"""``hvsock-host``: the grpc.aio server of the emulated Hyper-V host."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hvsock.v1 import hvsock_pb2, hvsock_pb2_grpc

from . import __version__

log = logging.getLogger("hvsock.host")

DEFAULT_LISTEN = "127.0.0.1:50051"
SERVICE_NAME = hvsock_pb2.DESCRIPTOR.services_by_name["HostService"].full_name


class HostServicer(hvsock_pb2_grpc.HostServiceServicer):  # type: ignore[misc]  # untyped gencode
    async def GetInfo(
        self, request: hvsock_pb2.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> hvsock_pb2.GetInfoResponse:
        return hvsock_pb2.GetInfoResponse(
            version=__version__,
            limits=hvsock_pb2.Limits(max_socket_number=1024, send_ring_page=2, recv_ring_page=3),
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Flags; each also reads ``HVSOCK_<FLAG>`` from the environment."""
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="hvsock-host", description="Emulated Hyper-V host for Hyper-V sockets (hv_sock)."
    )
    parser.add_argument(
        "--listen",
        default=env("HVSOCK_LISTEN", DEFAULT_LISTEN),
        help="HOST:PORT to serve gRPC on (default %(default)s; env HVSOCK_LISTEN)",
    )
    parser.add_argument(
        "--unix",
        default=env("HVSOCK_UNIX"),
        help="also serve on this Unix socket path (env HVSOCK_UNIX)",
    )
    parser.add_argument(
        "--log-level",
        default=env("HVSOCK_LOG_LEVEL", "INFO"),
        help="logging level (default %(default)s; env HVSOCK_LOG_LEVEL)",
    )
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace, started: asyncio.Event | None = None) -> None:
    server = grpc.aio.server()
    hvsock_pb2_grpc.add_HostServiceServicer_to_server(HostServicer(), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(args.listen)
    if port == 0:
        raise SystemExit(f"hvsock-host: cannot listen on {args.listen}")
    if args.unix:
        server.add_insecure_port(f"unix:{args.unix}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving on %s%s", args.listen, f" and unix:{args.unix}" if args.unix else "")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if started is not None:
        started.set()
    await stop.wait()
    log.info("draining")
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace=5)
    log.info("stopped")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
