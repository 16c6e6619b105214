"""A ``grpc.health.v1`` probe for container health checks: exit 0 when the host service serves.

    python -m host_service.healthcheck [TARGET] [--service NAME] [--timeout SECONDS]

TARGET defaults to ``HVSOCK_HOST``, then ``127.0.0.1:50051``. Exit status: 0 SERVING, 1 any
other status or no answer (the reason goes to stderr), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hvsock_common.conventions import DEFAULT_TARGET


def check(target: str, service: str = "", timeout: float = 3.0) -> tuple[bool, str]:
    """Ask ``target`` for the health of ``service`` ("" is the server as a whole)."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    return answer.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m host_service.healthcheck")
    parser.add_argument("target", nargs="?", default=os.environ.get("HVSOCK_HOST", DEFAULT_TARGET))
    parser.add_argument("--service", default="", help="service name (default: the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    args = parser.parse_args(argv)
    serving, status = check(args.target, args.service, args.timeout)
    if not serving:
        print(f"{args.target}: {status}", file=sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
