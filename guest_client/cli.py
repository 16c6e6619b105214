"""``hvsock``: command-line client and admin tool for the emulated Hyper-V host."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import grpc
from google.protobuf import json_format

from hvsock.v1 import hvsock_pb2, hvsock_pb2_grpc

DEFAULT_HOST = "127.0.0.1:50051"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="hvsock", description="Client and admin tool for the emulated Hyper-V host."
    )
    parser.add_argument(
        "--host",
        default=os.environ.get("HVSOCK_HOST", DEFAULT_HOST),
        help="host service address (default %(default)s; env HVSOCK_HOST)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="show the host service's version and limits")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with grpc.insecure_channel(args.host) as channel:
        stub = hvsock_pb2_grpc.HostServiceStub(channel)
        try:
            info = stub.GetInfo(hvsock_pb2.GetInfoRequest(), timeout=10)
        except grpc.RpcError as exc:
            print(f"hvsock: {args.host}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(json_format.MessageToDict(info, preserving_proto_field_name=True)))
    else:
        print(f"hvsock-emulator {info.version}")
        for field, value in info.limits.ListFields():
            print(f"  {field.name:<18} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
