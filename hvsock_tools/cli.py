"""``hvsock``: command-line client and admin tool for the emulated Hyper-V host.

Every command talks to a running ``hvsock-host`` over its gRPC API. The admin commands send the
host partition's token as ``x-hvsock-token`` metadata: ``--token``, else ``HVSOCK_HOST_TOKEN``,
else the file ``hvsock-host`` writes when it generates one (``HVSOCK_HOST_TOKEN_FILE`` or
``~/.config/hvsock/host-token``).

Output is a readable table by default and one JSON document with ``--json`` (``events --json``
prints one JSON document per line, as the events arrive). Failures print
``hvsock: <STATUS>: <message>`` on stderr and exit 1; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn

import grpc
from google.protobuf import timestamp_pb2

from guest_client import DATA_PATH_NAMES, PERSONALITIES
from hvsock.v1 import hvsock_pb2
from hvsock_common import addresses
from hvsock_common.conventions import DEFAULT_TARGET
from hvsock_common.errors import BadAddress

from . import proxies, run
from ._api import Client, CliError, describe_rpc_error, open_channel, vm_named

PAGE = 4096

DIRECTIONS = {
    "both": hvsock_pb2.StallRingRequest.DIRECTION_BOTH,
    "to-listener": hvsock_pb2.StallRingRequest.DIRECTION_TO_LISTENER,
    "to-connector": hvsock_pb2.StallRingRequest.DIRECTION_TO_CONNECTOR,
}


# -------------------------------------------------------------------------------------------
# Command line
# -------------------------------------------------------------------------------------------


def _global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The connection options. On sub-commands they default to SUPPRESS, so that they may be
    given before or after the command without the later parser resetting the earlier value."""

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    group = parser.add_argument_group("connection")
    group.add_argument(
        "--host",
        default=default(os.environ.get("HVSOCK_HOST", DEFAULT_TARGET)),
        metavar="HOST:PORT",
        help=f"host service address, or unix:PATH (default {DEFAULT_TARGET}; env HVSOCK_HOST)",
    )
    group.add_argument(
        "--token",
        default=default(None),
        help="the host token (default: env HVSOCK_HOST_TOKEN, else the token file "
        "hvsock-host writes)",
    )
    group.add_argument(
        "--json", action="store_true", default=default(False), help="print JSON for scripts"
    )
    group.add_argument(
        "--timeout",
        type=_positive_float,
        default=default(10.0),
        metavar="SECONDS",
        help="deadline of each call (default 10)",
    )
    group.add_argument(
        "--tls-ca",
        type=pathlib.Path,
        default=default(None),
        metavar="F",
        help="CA bundle (PEM) to verify the host with: use TLS",
    )
    group.add_argument(
        "--tls-cert",
        type=pathlib.Path,
        default=default(None),
        metavar="F",
        help="client certificate chain (PEM) for mutual TLS",
    )
    group.add_argument(
        "--tls-key",
        type=pathlib.Path,
        default=default(None),
        metavar="F",
        help="client private key (PEM) for mutual TLS",
    )
    group.add_argument(
        "--tls-server-name",
        default=default(None),
        metavar="NAME",
        help="name to check the host's certificate against (default: from --host)",
    )


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {text}")
    return value


def _uint32(text: str) -> int:
    # The server owns the range check (1..600000 ms); only what cannot travel is refused here.
    value = _nonnegative_int(text)
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"too large: {text}")
    return value


def _channel_id(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a channel id: {text!r}") from None
    if not 0 < value < 2**64:
        raise argparse.ArgumentTypeError(f"not a channel id: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hvsock",
        description="Client and admin tool for the emulated Hyper-V host (hvsock-host).",
        epilog="Errors print 'hvsock: <STATUS>: <message>' and exit 1; usage errors exit 2.",
    )
    _global_options(parser, top=True)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, top=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        group: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        handler: Callable[[argparse.Namespace, Client], Any],
        help: str,
    ) -> argparse.ArgumentParser:
        sub = group.add_parser(name, parents=[common], help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    command(commands, "info", cmd_info, "show the host service's version and limits")

    vms = commands.add_parser("vms", help="manage VM partitions")
    vm_commands = vms.add_subparsers(dest="vms_command", required=True, metavar="ACTION")
    create = command(vm_commands, "create", cmd_vms_create, "create a VM; prints its id and token")
    create.add_argument(
        "--name",
        required=True,
        help="the VM's name (element name): at most 64 letters, digits, '.', '_' and '-', "
        "starting with a letter or digit; unique on the host",
    )
    create.add_argument(
        "--personality",
        choices=sorted(PERSONALITIES),
        default="linux",
        help="how the guest answers a connect nobody listens for (default linux)",
    )
    create.add_argument("--vm-id", default="", metavar="GUID", help="VM id (default: random)")
    command(vm_commands, "list", cmd_vms_list, "list partitions, the host partition first")
    for name, handler, text in (
        ("get", cmd_vms_get, "show one partition"),
        ("delete", cmd_vms_delete, "delete a VM: detach it and rescind its channels"),
        ("pause", cmd_vms_pause, "pause a VM: its rings stall, channels stay open"),
        ("resume", cmd_vms_resume, "resume a paused or stopped VM"),
        ("stop", cmd_vms_stop, "turn a VM off: rescind its channels and detach it"),
    ):
        command(vm_commands, name, handler, text).add_argument(
            "vm", metavar="VM", help="a VM id, or a VM's name (in any case)"
        )

    services = commands.add_parser("services", help="the service registry")
    svc_commands = services.add_subparsers(dest="services_command", required=True, metavar="ACTION")
    register = command(svc_commands, "register", cmd_services_register, "register a service id")
    register.add_argument("service_id", metavar="SERVICE_ID")
    register.add_argument("--name", required=True, help="the registration's ElementName")
    command(svc_commands, "list", cmd_services_list, "list registered services")
    command(
        svc_commands, "unregister", cmd_services_unregister, "remove a registration"
    ).add_argument("service_id", metavar="SERVICE_ID")

    channels = command(commands, "channels", cmd_channels, "list channels (like ss)")
    channels.add_argument(
        "--vm", default="", metavar="VM", help="only channels of this VM (its id or name)"
    )

    events = command(
        commands, "events", cmd_events, "follow lifecycle events until Ctrl-C (JSON lines)"
    )
    events.add_argument(
        "--replay",
        type=_nonnegative_int,
        default=0,
        metavar="N",
        help="first replay up to N of the most recent events",
    )
    events.add_argument(
        "--count", type=_nonnegative_int, default=0, metavar="N", help="stop after N events"
    )

    rescind = command(commands, "rescind", cmd_rescind, "rescind a channel now (fault injection)")
    rescind.add_argument("channel_id", type=_channel_id, metavar="CHANNEL")
    rescind.add_argument("--reason", default="", help="recorded in events and notices")

    stall = command(commands, "stall", cmd_stall, "stall a channel's ring (fault injection)")
    stall.add_argument("channel_id", type=_channel_id, metavar="CHANNEL")
    stall.add_argument(
        "--ms", type=_uint32, required=True, metavar="N", help="for how long, in milliseconds"
    )
    stall.add_argument("--direction", choices=list(DIRECTIONS), default="both")

    proxies.add_cli_commands(commands, command)
    run.add_cli_command(commands, command)
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_cert is not None and args.tls_ca is None:
        parser.error("--tls-cert needs --tls-ca")
    return args


# -------------------------------------------------------------------------------------------
# Rendering
# -------------------------------------------------------------------------------------------


def _short(enum_value: int, enum: Any, prefix: str) -> str:
    name: str = enum.Name(enum_value)
    return name.removeprefix(prefix).lower().replace("_", "-")


def personality_name(value: int) -> str:
    return _short(value, hvsock_pb2.Personality, "PERSONALITY_")


def state_name(value: int) -> str:
    return _short(value, hvsock_pb2.PartitionState, "PARTITION_STATE_")


def channel_state_name(value: int) -> str:
    return _short(value, hvsock_pb2.ChannelState, "CHANNEL_STATE_")


def timestamp_text(stamp: timestamp_pb2.Timestamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return ""
    when = datetime.datetime.fromtimestamp(stamp.seconds + stamp.nanos / 1e9, tz=datetime.UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def partition_dict(p: hvsock_pb2.Partition) -> dict[str, Any]:
    return {
        "vm_id": p.vm_id,
        "name": p.name,
        "personality": personality_name(p.personality),
        "state": state_name(p.state),
        "host": p.host,
        "attached": p.attached,
        "channel_count": p.channel_count,
        "listener_count": p.listener_count,
        "session_count": p.session_count,
        # The vsock CID a host-side `hvsock run` program dials this VM at (none in Hyper-V).
        "cid": addresses.VMADDR_CID_HOST if p.host else addresses.cid_for_vm_id(p.vm_id),
    }


def direction_dict(d: hvsock_pb2.ChannelDirection) -> dict[str, Any]:
    capacity = max(d.ring_pages - 1, 0) * PAGE  # the first page is the ring's control page
    return {
        "bytes": d.bytes,
        "ring_pages": d.ring_pages,
        "ring_used": d.ring_used,
        "ring_fill": round(d.ring_used / capacity, 4) if capacity else 0.0,
    }


def channel_dict(c: hvsock_pb2.ChannelStatus) -> dict[str, Any]:
    return {
        "channel_id": c.channel_id,
        "state": channel_state_name(c.state),
        "connector": {"vm_id": c.connector.vm_id, "service_id": c.connector.service_id},
        "listener": {"vm_id": c.listener.vm_id, "service_id": c.listener.service_id},
        "connector_data_path": DATA_PATH_NAMES.get(c.connector_data_path, "-"),
        "listener_data_path": DATA_PATH_NAMES.get(c.listener_data_path, "-"),
        "to_listener": direction_dict(c.to_listener),
        "to_connector": direction_dict(c.to_connector),
        "created": timestamp_text(c.created),
    }


def event_dict(e: hvsock_pb2.WatchEventsResponse) -> dict[str, Any]:
    return {
        "time": timestamp_text(e.time),
        "kind": e.kind,
        "vm_id": e.vm_id,
        "channel_id": e.channel_id,
        "detail": e.detail,
        "session_id": e.session_id,
    }


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    cells = [list(headers)] + [["-" if v == "" else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def emit_json(document: Any) -> None:
    print(json.dumps(document, indent=2, sort_keys=False), flush=True)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


PARTITION_HEADERS = (
    "VM_ID",
    "KIND",
    "NAME",
    "PERSONALITY",
    "STATE",
    "ATTACHED",
    "CHANNELS",
    "LISTENERS",
    "SESSIONS",
    "CID",
)


def partition_row(p: dict[str, Any]) -> list[Any]:
    return [
        p["vm_id"],
        "host" if p["host"] else "vm",
        p["name"],
        p["personality"],
        p["state"],
        _yes(p["attached"]),
        p["channel_count"],
        p["listener_count"],
        p["session_count"],
        p["cid"],
    ]


def show_partition(args: argparse.Namespace, p: hvsock_pb2.Partition) -> None:
    info = partition_dict(p)
    if args.json:
        emit_json(info)
    else:
        print(table(PARTITION_HEADERS, [partition_row(info)]))


def _fill_text(d: dict[str, Any]) -> str:
    return f"{d['ring_used']}/{max(d['ring_pages'] - 1, 0) * PAGE} ({d['ring_fill']:.0%})"


# -------------------------------------------------------------------------------------------
# Commands
# -------------------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace, client: Client) -> None:
    info = client.host.GetInfo(hvsock_pb2.GetInfoRequest(), timeout=client.timeout)
    limits = {
        field.name: getattr(info.limits, field.name) for field in info.limits.DESCRIPTOR.fields
    }
    if args.json:
        emit_json({"version": info.version, "limits": limits})
    else:
        print(f"hvsock-emulator {info.version}")
        for name, value in limits.items():
            print(f"  {name:<22} {str(value).lower() if isinstance(value, bool) else value}")


def cmd_vms_create(args: argparse.Namespace, client: Client) -> None:
    created = client.call(
        client.admin.CreatePartition,
        hvsock_pb2.CreatePartitionRequest(
            name=args.name, vm_id=args.vm_id, personality=PERSONALITIES[args.personality]
        ),
    )
    if args.json:
        emit_json({"vm_id": created.partition.vm_id, "token": created.token})
    else:
        print(f"vm_id: {created.partition.vm_id}")
        print(f"token: {created.token}")


def cmd_vms_list(args: argparse.Namespace, client: Client) -> None:
    listed = client.call(client.admin.ListPartitions, hvsock_pb2.ListPartitionsRequest())
    partitions = [partition_dict(p) for p in listed.partitions]
    if args.json:
        emit_json({"partitions": partitions})
    else:
        print(table(PARTITION_HEADERS, [partition_row(p) for p in partitions]))


def vm_id_of(client: Client, vm: str) -> str:
    """The VM id ``vm`` is: itself when it is one (the host checks it), else the id of the VM
    with that name."""
    try:
        return addresses.parse_guid(vm)
    except BadAddress:
        pass
    listed = client.call(client.admin.ListPartitions, hvsock_pb2.ListPartitionsRequest())
    vm_id = vm_named(listed.partitions, vm)
    if vm_id is not None:
        return vm_id
    raise CliError("NOT_FOUND", f"no VM with id or name {vm!r} (see hvsock vms list)")


def cmd_vms_get(args: argparse.Namespace, client: Client) -> None:
    vm_id = vm_id_of(client, args.vm)
    got = client.call(client.admin.GetPartition, hvsock_pb2.GetPartitionRequest(vm_id=vm_id))
    show_partition(args, got.partition)


def cmd_vms_delete(args: argparse.Namespace, client: Client) -> None:
    vm_id = vm_id_of(client, args.vm)
    client.call(client.admin.DeletePartition, hvsock_pb2.DeletePartitionRequest(vm_id=vm_id))
    if args.json:
        emit_json({"vm_id": vm_id, "deleted": True})
    else:
        print(f"deleted {vm_id}")


def cmd_vms_pause(args: argparse.Namespace, client: Client) -> None:
    vm_id = vm_id_of(client, args.vm)
    done = client.call(client.admin.PausePartition, hvsock_pb2.PausePartitionRequest(vm_id=vm_id))
    show_partition(args, done.partition)


def cmd_vms_resume(args: argparse.Namespace, client: Client) -> None:
    vm_id = vm_id_of(client, args.vm)
    done = client.call(client.admin.ResumePartition, hvsock_pb2.ResumePartitionRequest(vm_id=vm_id))
    show_partition(args, done.partition)


def cmd_vms_stop(args: argparse.Namespace, client: Client) -> None:
    vm_id = vm_id_of(client, args.vm)
    done = client.call(client.admin.StopPartition, hvsock_pb2.StopPartitionRequest(vm_id=vm_id))
    show_partition(args, done.partition)


def cmd_services_register(args: argparse.Namespace, client: Client) -> None:
    done = client.call(
        client.admin.RegisterService,
        hvsock_pb2.RegisterServiceRequest(service_id=args.service_id, element_name=args.name),
    )
    if args.json:
        emit_json(
            {"service_id": done.service.service_id, "element_name": done.service.element_name}
        )
    else:
        print(f"registered {done.service.service_id} ({done.service.element_name})")


def cmd_services_list(args: argparse.Namespace, client: Client) -> None:
    listed = client.call(client.admin.ListServices, hvsock_pb2.ListServicesRequest())
    services = [
        {"service_id": s.service_id, "element_name": s.element_name} for s in listed.services
    ]
    if args.json:
        emit_json({"services": services})
    else:
        print(
            table(
                ("SERVICE_ID", "ELEMENT_NAME"),
                [(s["service_id"], s["element_name"]) for s in services],
            )
        )


def cmd_services_unregister(args: argparse.Namespace, client: Client) -> None:
    client.call(
        client.admin.UnregisterService,
        hvsock_pb2.UnregisterServiceRequest(service_id=args.service_id),
    )
    if args.json:
        emit_json({"service_id": args.service_id, "unregistered": True})
    else:
        print(f"unregistered {args.service_id}")


def cmd_channels(args: argparse.Namespace, client: Client) -> None:
    vm_id = vm_id_of(client, args.vm) if args.vm else ""
    listed = client.call(client.admin.ListChannels, hvsock_pb2.ListChannelsRequest(vm_id=vm_id))
    channels = [channel_dict(c) for c in listed.channels]
    if args.json:
        emit_json({"channels": channels})
        return
    print(
        table(
            (
                "ID",
                "STATE",
                "CONNECTOR",
                "LISTENER",
                "PATH(C/L)",
                "BYTES->L",
                "BYTES->C",
                "RING->L",
                "RING->C",
            ),
            [
                (
                    c["channel_id"],
                    c["state"],
                    f"{c['connector']['vm_id']}:{c['connector']['service_id']}",
                    f"{c['listener']['vm_id']}:{c['listener']['service_id']}",
                    f"{c['connector_data_path']}/{c['listener_data_path']}",
                    c["to_listener"]["bytes"],
                    c["to_connector"]["bytes"],
                    _fill_text(c["to_listener"]),
                    _fill_text(c["to_connector"]),
                )
                for c in channels
            ],
        )
    )


def cmd_events(args: argparse.Namespace, client: Client) -> None:
    # A stream with no deadline: it follows until Ctrl-C (or --count events).
    stream = client.admin.WatchEvents(
        hvsock_pb2.WatchEventsRequest(replay=args.replay), metadata=client.metadata
    )
    # Ctrl-C cancels the stream from another thread, so it ends as CANCELLED (exit 0): a
    # KeyboardInterrupt raised inside grpc's own waits could leave its locks held.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(
            signum, lambda *_: threading.Thread(target=stream.cancel, daemon=True).start()
        )
    seen = 0
    try:
        for event in stream:
            info = event_dict(event)
            if args.json:
                print(json.dumps(info), flush=True)
            else:
                channel = f"#{info['channel_id']}" if info["channel_id"] else "-"
                session = f"s{info['session_id']}" if info["session_id"] else "-"
                print(
                    f"{info['time']}  {info['kind']:<14} {info['vm_id'] or '-':<36}"
                    f"  {channel:<6} {session:<5} {info['detail']}".rstrip(),
                    flush=True,
                )
            seen += 1
            if args.count and seen >= args.count:
                break
    finally:
        stream.cancel()


def cmd_rescind(args: argparse.Namespace, client: Client) -> None:
    client.call(
        client.admin.RescindChannel,
        hvsock_pb2.RescindChannelRequest(channel_id=args.channel_id, reason=args.reason),
    )
    if args.json:
        emit_json({"channel_id": args.channel_id, "rescinded": True})
    else:
        print(f"rescinded channel {args.channel_id}")


def cmd_stall(args: argparse.Namespace, client: Client) -> None:
    client.call(
        client.admin.StallRing,
        hvsock_pb2.StallRingRequest(
            channel_id=args.channel_id,
            direction=DIRECTIONS[args.direction],
            duration_ms=args.ms,
        ),
    )
    if args.json:
        emit_json({"channel_id": args.channel_id, "direction": args.direction, "ms": args.ms})
    else:
        print(f"stalled channel {args.channel_id} ({args.direction}) for {args.ms} ms")


# -------------------------------------------------------------------------------------------
# Entry point
# -------------------------------------------------------------------------------------------


def _fail(error: CliError) -> int:
    print(f"hvsock: {error.status}: {error.message}", file=sys.stderr)
    return 1


def _interrupted(signum: int, frame: Any) -> NoReturn:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        with open_channel(args) as channel:
            args.handler(args, Client(args, channel))
    except CliError as exc:
        return _fail(exc)
    except grpc.RpcError as exc:
        if args.command == "events" and exc.code() == grpc.StatusCode.CANCELLED:
            return 0
        return _fail(describe_rpc_error(exc))
    except KeyboardInterrupt:
        return 0 if args.command == "events" else 130
    except BrokenPipeError:
        # The reader went away (e.g. `hvsock events | head`): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
