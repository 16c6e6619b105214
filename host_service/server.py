"""``hvsock-host``: the grpc.aio server of the emulated Hyper-V host."""

from __future__ import annotations

# First of all: gRPC reads which I/O stack to run on when it is imported.
from . import _grpc  # noqa: F401  # isort: skip

import argparse
import asyncio
import json
import logging
import os
import pathlib
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from hvsock.v1 import hvsock_pb2, hvsock_pb2_grpc
from hvsock_common.allocator import tune_for_large_messages
from hvsock_common.conventions import new_token

from . import metrics
from .core.config import HostConfig
from .core.errors import HvError
from .core.relay import RelayBudget
from .dataplane import DataPlane
from .handover import default_address
from .service import AdminServicer, Host, HostServicer, new_core
from .settings import parse_args
from .store import StateStore
from .wire import RejectMalformed

log = logging.getLogger("hvsock.host")

SERVICE_NAMES = tuple(
    service.full_name for service in hvsock_pb2.DESCRIPTOR.services_by_name.values()
)
#: Keep idle attach streams alive through NATs and proxies, and accept clients' pings.
SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),  # clients ping every 30 s
    ("grpc.max_receive_message_length", 1 << 20),
]
#: How long a draining host waits for its attach streams to end before rescinding the rest.
_DRAIN_STREAMS_TIMEOUT = 2.0


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def host_token(args: argparse.Namespace) -> str:
    """The given token, or a new one written to a file only this user can read."""
    if args.host_token:
        return str(args.host_token)
    token = new_token()
    path: pathlib.Path = args.host_token_file
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as file:
        os.fchmod(fd, 0o600)
        file.write(token + "\n")
    print(f"hvsock-host: host token {token} (also in {path})", file=sys.stderr, flush=True)
    return token


def build_host(args: argparse.Namespace, token: str) -> Host:
    config = HostConfig(
        max_socket_number=args.max_socket_number,
        max_sessions_per_partition=args.max_sessions_per_partition,
        max_partitions=args.max_partitions,
        send_ring_page=args.send_ring_page,
        recv_ring_page=args.recv_ring_page,
        strict_registry=args.strict_registry,
        allow_guest_to_guest=args.allow_guest_to_guest,
        auto_create_on_attach=args.auto_create_vms,
        connect_timeout=args.connect_timeout_ms / 1000,
        close_timeout=args.close_timeout_ms / 1000,
    )
    core = new_core(config, token)
    store = StateStore(args.state) if args.state else None
    if store is not None:
        for record in store.partitions():
            core.restore_partition(
                vm_id=record.vm_id,
                name=record.name,
                personality=record.personality,
                token_sha256=record.token_sha256,
                state=record.state,
                created_at=0.0,
                auto_created=record.auto_created,
            )
        for service in store.services():
            core.register_service(service.service_id, service.element_name, 0.0)
    return Host(
        core,
        # An end handed its rings must map them within the connect timeout.
        dataplane=DataPlane(map_timeout=config.connect_timeout, forward=not args.relay_rings),
        store=store,
        shm_socket=None if args.shm_socket == "off" else args.shm_socket or default_address(),
        max_queued_responses=args.max_queued_responses,
        relay_window=args.relay_window,
        relay_budget=RelayBudget(args.relay_window_budget),
    )


def _read(path: pathlib.Path) -> bytes:
    return path.read_bytes()


def server_credentials(args: argparse.Namespace) -> grpc.ServerCredentials | None:
    if args.tls_cert is None:
        return None
    ca = _read(args.tls_ca) if args.tls_ca else None
    return grpc.ssl_server_credentials(
        [(_read(args.tls_key), _read(args.tls_cert))],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


#: The reflection service under its current name. grpcio-reflection serves only v1alpha; v1 is
#: the same protocol with the same messages under another package name (current grpcurl and
#: Postman ask for v1 first), so the v1alpha servicer answers both.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def build_server(host: Host, token: str) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """The grpc.aio server with every service on it (no port yet): the API, health, reflection."""
    # Every service's requests, ours and health's and reflection's, decode through one check.
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[RejectMalformed()])
    hvsock_pb2_grpc.add_HostServiceServicer_to_server(HostServicer(host), server)
    hvsock_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(host, token), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1)
    reflection.enable_server_reflection(names, server)
    servicer = reflection.aio.ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": handler}),)
    )
    return server, health_servicer


async def serve(args: argparse.Namespace, token: str) -> None:
    host = build_host(args, token)
    server, health_servicer = build_server(host, token)
    credentials = server_credentials(args)
    if credentials is not None:
        port = server.add_secure_port(args.listen, credentials)
    else:
        port = server.add_insecure_port(args.listen)
    if port == 0:
        raise SystemExit(f"hvsock-host: cannot listen on {args.listen}")
    if args.unix:
        server.add_insecure_port(f"unix:{args.unix}")
    host.start()
    await server.start()
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    listen_host = args.listen.rsplit(":", 1)[0]
    where = f"{listen_host}:{port}" + (f" and unix:{args.unix}" if args.unix else "")
    metrics_note = ""
    if args.metrics_port is not None:
        metrics_port = metrics.serve(args.metrics_address, args.metrics_port)
        metrics_note = f", metrics on {args.metrics_address}:{metrics_port}"
    loop = asyncio.get_running_loop()
    log.info(
        "serving on %s%s%s (event loop: %s)",
        where,
        " (TLS)" if credentials else "",
        metrics_note,
        _loop_name(loop),
    )

    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("draining")
    # From here on an attach is refused (UNAVAILABLE): a program re-attaching after its stream
    # ended must wait for the next host, not be welcomed by this one in its last seconds.
    host.draining = True
    await health_servicer.enter_graceful_shutdown()
    # End every attach stream before any channel is rescinded, so that each program hears
    # "the host went away" (its sockets reset, ECONNRESET, as when the host dies) and never
    # an ordinary rescind (EOF, then EPIPE) first.  The handlers then detach their sessions,
    # which rescinds every channel; the wait is bounded for a client that does not read.
    for attachment in list(host.attachments.values()):
        attachment.end("host shutting down")
    handlers = [a.task for a in host.attachments.values() if a.task is not None]
    if handlers:
        await asyncio.wait(handlers, timeout=_DRAIN_STREAMS_TIMEOUT)
    try:
        host.call(host.core.rescind_all, reason="host shutting down")
    except HvError:
        log.exception("rescinding channels at shutdown")
    await server.stop(grace=2)
    host.close()
    if host.store is not None:
        host.store.close()
    log.info("stopped")


def main(argv: Sequence[str] | None = None) -> None:
    # Relayed bytes pass through here in messages of up to 1 MiB (see the module).
    tune_for_large_messages()
    args = parse_args(argv)
    handler = logging.StreamHandler()
    if args.log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=args.log_level, handlers=[handler])
    token = host_token(args)
    run_on(args.event_loop, serve(args, token))


def _loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """The running loop's class, e.g. ``uvloop.Loop``: what ``--event-loop`` gave, as run."""
    return f"{type(loop).__module__}.{type(loop).__qualname__}"


def run_on(event_loop: str, main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` to its end on the event loop named by ``--event-loop``.

    uvloop by default: every relayed frame and every connect costs the host some turns of its
    loop, and uvloop's are in C. Measured with alternated runs (December 2026), the host spent
    15-25% less CPU per relayed GB and per relayed connect than on asyncio's loop."""
    if event_loop == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


if __name__ == "__main__":
    main()
