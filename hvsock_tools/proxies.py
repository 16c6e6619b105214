"""``hvsock bridge`` and ``hvsock hybrid-vsock``: the command line of the two proxies."""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from guest_client import Partition, attach, attach_host, find_token

from ._api import CliError, list_vms, open_channel, tls_credentials, vm_named
from .bridge import _VM_NAME, Bridge, HvEndpoint, PlainEndpoint, _guid, parse_endpoint, parse_vm
from .hybrid import HybridVsock


def _ring_pages(text: str) -> int:
    value = int(text)
    if not (value == 0 or 2 <= value <= 64):
        raise argparse.ArgumentTypeError("ring pages are 2..64, or 0 for the host's default")
    return value


def _id_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def add_cli_commands(commands: Any, command: Callable[..., Any]) -> None:
    """Add the ``bridge`` and ``hybrid-vsock`` sub-commands to ``hvsock``'s parser."""
    bridge = command(
        commands,
        "bridge",
        cli_bridge,
        "relay plain TCP/Unix connections to hv sockets, or an hv service to TCP (socat-like)",
    )
    bridge.add_argument(
        "--listen",
        required=True,
        metavar="ENDPOINT",
        help="tcp:HOST:PORT (or HOST:PORT), unix:PATH, or hv:VM:SERVICE to listen on",
    )
    bridge.add_argument(
        "--connect",
        required=True,
        metavar="ENDPOINT",
        help="where each connection goes: hv:VM:SERVICE, or tcp:HOST:PORT / unix:PATH "
        "(VM: a GUID, parent, wildcard, children, loopback, or a VM name looked up for each "
        "connection; SERVICE: a GUID or a vsock port)",
    )
    _partition_options(bridge, vm=True)
    hybrid = command(
        commands,
        "hybrid-vsock",
        cli_hybrid,
        "serve a Firecracker/OpenVMM-style hybrid vsock Unix socket for one VM",
    )
    hybrid.add_argument("--path", required=True, help="the Unix socket (guest ports: PATH_PORT)")
    hybrid.add_argument(
        "--vm-id",
        required=True,
        metavar="VM",
        help="the VM to reach: its GUID, or its name (looked up for each CONNECT; with "
        "--guest-ports/--guest-services also once at start, waiting for it, for the listeners)",
    )
    hybrid.add_argument(
        "--guest-ports",
        type=_id_list,
        default=[],
        metavar="P,Q",
        help="host ports the guest connects to: relayed to PATH_P",
    )
    hybrid.add_argument(
        "--guest-services",
        type=_id_list,
        default=[],
        metavar="GUID,...",
        help="host service ids the guest connects to: relayed to PATH_GUID",
    )
    _partition_options(hybrid, vm=False)


def _partition_options(parser: Any, *, vm: bool) -> None:
    if vm:
        parser.add_argument(
            "--vm-id",
            default=None,
            metavar="GUID",
            help="act as this VM (its token: --token or HVSOCK_TOKEN); default: the host partition",
        )
    parser.add_argument(
        "--host-token",
        default=None,
        metavar="TOKEN",
        help="the host partition's token (default: --token, HVSOCK_HOST_TOKEN, the token file)",
    )
    parser.add_argument(
        "--ring-pages",
        type=_ring_pages,
        default=64,
        metavar="N",
        help="ring pages each way for the connections it opens (2..64, default 64)",
    )
    parser.add_argument(
        "--connect-timeout-ms",
        type=int,
        default=None,
        metavar="MS",
        help="HVSOCKET_CONNECT_TIMEOUT for the hv connects it makes",
    )


def _cli_partition(args: Any) -> Partition:
    credentials = tls_credentials(args)
    if getattr(args, "vm_id", None) and args.command == "bridge":
        token = args.token if args.token is not None else os.environ.get("HVSOCK_TOKEN", "")
        return attach(args.host, vm_id=args.vm_id, token=token, credentials=credentials)
    in_vm = os.environ.get("HVSOCK_VM_ID") or os.environ.get("HVSOCK_VM_IDENTITY")
    if args.command == "bridge" and in_vm and not args.host_token:
        return attach(args.host, credentials=credentials)  # the VM the environment names
    token = args.host_token or find_token(args.token) or ""
    return attach_host(args.host, token=token, credentials=credentials)


def _vm_resolver(args: Any) -> Callable[[str], str]:
    """Look a VM up by name with the admin API (so it needs the host token)."""

    def resolve(name: str) -> str:
        token = args.host_token or find_token(args.token) or ""
        with open_channel(args) as channel:
            vms = list_vms(
                channel, token, errno_code=errno.EHOSTUNREACH, doing=f"looking up VM {name!r}"
            )
        vm_id = vm_named(vms, name)
        if vm_id is None:
            raise OSError(errno.EHOSTUNREACH, f"no VM named {name!r}")
        return vm_id

    return resolve


def _wait_for_vm(resolve: Callable[[str], str], name: str) -> str:
    """The id of the VM named ``name``, waiting until such a VM exists (in a testbed, the VM
    container may create itself after this endpoint starts)."""
    said = False
    while True:
        try:
            return resolve(name)
        except OSError as exc:
            if not said:
                print(f"waiting for VM {name!r} ({exc.strerror})", file=sys.stderr, flush=True)
                said = True
        time.sleep(0.5)  # poll: the admin API has no "VM appeared" wait


def _serve(server: Any, banner: Callable[[], str]) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await server.start()
        try:
            print(banner(), flush=True)
            await stop.wait()
        finally:
            await server.aclose()

    asyncio.run(main())


def cli_bridge(args: Any, client: Any) -> None:
    try:
        listen, connect = parse_endpoint(args.listen), parse_endpoint(args.connect)
        partition = _cli_partition(args)
        bridge = Bridge(
            listen,
            connect,
            partition,
            ring_pages=args.ring_pages,
            connect_timeout_ms=args.connect_timeout_ms,
            resolve_vm=_vm_resolver(args),
        )
    except ValueError as exc:
        raise CliError("INVALID_ARGUMENT", str(exc)) from None
    except OSError as exc:
        raise CliError("UNAVAILABLE", str(exc)) from None
    try:

        def banner() -> str:
            where = bridge.address
            if isinstance(listen, PlainEndpoint) and not listen.is_unix:
                where = f"tcp:{where[0]}:{where[1]}"
            elif isinstance(listen, HvEndpoint):
                where = f"hv:{where[0]}:{where[1]}"
            else:
                where = f"unix:{where}"
            return f"bridge listening on {where} -> {connect}"

        _serve(bridge, banner)
    except OSError as exc:
        raise CliError("UNAVAILABLE", str(exc)) from None
    finally:
        partition.close()


def cli_hybrid(args: Any, client: Any) -> None:
    try:
        ports = [int(p) for p in args.guest_ports]
        services = [_guid(s) for s in args.guest_services]
        vm_name = ""
        try:
            vm_id = parse_vm(args.vm_id)
        except ValueError:
            if not _VM_NAME.fullmatch(args.vm_id):
                raise ValueError(f"not a VM id or name: {args.vm_id!r}") from None
            vm_name = args.vm_id
            # A CONNECT looks the name up when it comes; the guest ports' listeners need an
            # id now.
            vm_id = _wait_for_vm(_vm_resolver(args), vm_name) if ports or services else ""
        partition = _cli_partition(args)
        endpoint = HybridVsock(
            partition,
            vm_id,
            args.path,
            guest_ports=ports,
            guest_services=services,
            ring_pages=args.ring_pages,
            connect_timeout_ms=args.connect_timeout_ms,
            vm_name=vm_name,
            resolve_vm=_vm_resolver(args) if vm_name else None,
        )
    except ValueError as exc:
        raise CliError("INVALID_ARGUMENT", str(exc)) from None
    except OSError as exc:
        raise CliError("UNAVAILABLE", str(exc)) from None
    try:
        vm = f"the VM named {vm_name!r} (looked up for each CONNECT)" if vm_name else f"VM {vm_id}"
        _serve(endpoint, lambda: f"hybrid-vsock listening on unix:{args.path} for {vm}")
    except OSError as exc:
        raise CliError("UNAVAILABLE", str(exc)) from None
    finally:
        partition.close()
