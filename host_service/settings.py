"""``hvsock-host`` command line: every flag also reads ``HVSOCK_<FLAG>`` from the environment."""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

from hvsock_common.conventions import DEFAULT_TARGET, default_host_token_file

from .core.relay import DEFAULT_RELAY_BUDGET, DEFAULT_RELAY_WINDOW, MAX_RELAY_WINDOW


def _env_name(flag: str) -> str:
    return "HVSOCK_" + flag.lstrip("-").replace("-", "_").upper()


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, not {value}")
    return value


def _relay_window(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_RELAY_WINDOW:
        raise argparse.ArgumentTypeError(f"must be in [0, {MAX_RELAY_WINDOW}], not {value}")
    return value


#: The event loops the host can run on; the first is the default.
EVENT_LOOPS = ("uvloop", "asyncio")


#: How the host logs: lines of text, or one JSON object per line.
LOG_FORMATS = ("text", "json")


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    """A type for a flag with fixed values (an environment value is checked by it as well)."""

    def check(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(choices)}, not {text!r}")
        return text

    return check


def _log_level(text: str) -> str:
    """A logging level's name, in either case (``info``, ``DEBUG``)."""
    names = logging.getLevelNamesMapping()
    if text.upper() not in names:
        known = ", ".join(name for name in names if name not in ("NOTSET", "WARN", "FATAL"))
        raise argparse.ArgumentTypeError(f"must be a logging level ({known}), not {text!r}")
    return text.upper()


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {value}")
    return value


class _Parser:
    """argparse with environment defaults, so that both spellings share one definition."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser
        self.env_errors: list[str] = []

    def option(
        self,
        flag: str,
        *,
        help: str,
        default: Any = None,
        type: Callable[[str], Any] = str,
        metavar: str | None = None,
        hidden: bool = False,
    ) -> None:
        env = _env_name(flag)
        raw = os.environ.get(env)
        if raw is not None:
            try:
                default = type(raw)
            except (ValueError, argparse.ArgumentTypeError) as exc:
                self.env_errors.append(f"{env}={raw!r}: {exc}")
        shown = "" if default is None else " (default %(default)s)"
        self.parser.add_argument(
            flag,
            default=default,
            type=type,
            metavar=metavar,
            help=argparse.SUPPRESS if hidden else f"{help}{shown}; env {env}",
        )

    def switch(self, flag: str, *, help: str) -> None:
        env = _env_name(flag)
        raw = os.environ.get(env)
        default = False
        if raw is not None:
            try:
                default = _parse_bool(raw)
            except ValueError as exc:
                self.env_errors.append(f"{env}: {exc}")
        self.parser.add_argument(
            flag, action=argparse.BooleanOptionalAction, default=default, help=f"{help}; env {env}"
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="hvsock-host",
        description="Emulated Hyper-V host for Hyper-V sockets (hv_sock, AF_HYPERV).",
    )
    p = _Parser(parser)
    p.option(
        "--listen", default=DEFAULT_TARGET, metavar="HOST:PORT", help="gRPC address to serve on"
    )
    p.option("--unix", metavar="PATH", help="also serve gRPC on this Unix socket")
    p.option(
        "--state",
        type=pathlib.Path,
        metavar="FILE",
        help="SQLite file that keeps partitions, tokens and registrations across restarts",
    )
    p.option(
        "--host-token",
        metavar="TOKEN",
        help="the host partition's token (admin API and host attach); generated when unset",
    )
    p.option(
        "--host-token-file",
        type=pathlib.Path,
        metavar="FILE",
        help="where a generated host token is written, mode 0600 "
        "(default ~/.config/hvsock/host-token)",
    )
    p.switch("--strict-registry", help="host listeners need a registered service id")
    p.switch("--allow-guest-to-guest", help="let VMs connect to other VMs (never on Hyper-V)")
    p.switch("--auto-create-vms", help="create a VM when one attaches without a VM id")
    p.option(
        "--max-socket-number",
        type=_positive_int,
        default=1024,
        metavar="N",
        help="most channels one partition may hold",
    )
    p.option(
        "--max-sessions-per-partition",
        type=_positive_int,
        default=64,
        metavar="N",
        help="most attach sessions (attached processes) one partition may have at once",
    )
    p.option(
        "--max-partitions",
        type=_positive_int,
        default=1024,
        metavar="N",
        help="most VMs the host keeps (created by the admin API or on attach)",
    )
    p.option(
        "--send-ring-page",
        type=_positive_int,
        default=2,
        metavar="N",
        help="default guest send ring, 4 KiB pages",
    )
    p.option(
        "--recv-ring-page",
        type=_positive_int,
        default=3,
        metavar="N",
        help="default guest receive ring, 4 KiB pages",
    )
    p.option(
        "--connect-timeout-ms",
        type=_positive_int,
        default=2000,
        metavar="MS",
        help="connect timeout of Linux-personality partitions when a connect gives none",
    )
    p.option(
        "--close-timeout-ms",
        type=_positive_int,
        default=8000,
        metavar="MS",
        help="how long a closing channel waits for the peer before the host rescinds it",
    )
    p.option(
        "--relay-window",
        type=_relay_window,
        default=DEFAULT_RELAY_WINDOW,
        metavar="BYTES",
        help="bytes a relayed end may send beyond the room in its peer's ring, which the host "
        "holds meanwhile (a Connect/Accept may ask for another); 0: strict, the ring's "
        "back-pressure byte for byte",
    )
    p.option(
        "--relay-window-budget",
        type=_non_negative_int,
        default=DEFAULT_RELAY_BUDGET,
        metavar="BYTES",
        help="relay window bytes all relayed ends together may have promised (the most the "
        "host holds beyond its rings); an end opened when it is spent is strict until some "
        "comes back",
    )
    p.switch(
        "--relay-rings",
        help="put a channel relayed at both ends on host rings with pump threads, as a channel "
        "with one end on shared memory is, instead of passing its frames from stream to stream "
        "(for tests of the ring relay, and comparisons)",
    )
    p.option(
        "--max-queued-responses",
        type=_positive_int,
        default=65536,
        metavar="N",
        hidden=True,
        help="answers queued for a partition that does not read them before it is detached",
    )
    p.option(
        "--metrics-port",
        type=_port,
        metavar="N",
        help="serve Prometheus metrics over HTTP on this port (0: any free port)",
    )
    p.option("--metrics-address", default="127.0.0.1", help="address for the metrics port")
    p.option("--tls-cert", type=pathlib.Path, metavar="F", help="server certificate chain (PEM)")
    p.option("--tls-key", type=pathlib.Path, metavar="F", help="server private key (PEM)")
    p.option(
        "--tls-ca",
        type=pathlib.Path,
        metavar="F",
        help="CA bundle (PEM): require and verify client certificates (mutual TLS)",
    )
    p.option(
        "--shm-socket",
        default="",
        metavar="ADDRESS",
        help="Unix socket on which programs receive their channels' ring memory (a path, e.g. "
        "in a volume shared with VM containers, or @NAME for an abstract socket; default: a "
        "private abstract name; 'off': every channel on the gRPC relay)",
    )
    p.option(
        "--event-loop",
        type=_one_of(EVENT_LOOPS),
        default=EVENT_LOOPS[0],
        metavar="LOOP",
        help="the event loop the host runs on: uvloop (its loop in C: less CPU for every relayed "
        "frame and connect) or asyncio (the standard library's)",
    )
    p.option("--log-level", type=_log_level, default="INFO", metavar="LEVEL", help="logging level")
    p.option(
        "--log-format",
        type=_one_of(LOG_FORMATS),
        default=LOG_FORMATS[0],
        metavar="FORMAT",
        help="text, or json for one JSON object per line",
    )
    args = parser.parse_args(argv)
    if p.env_errors:
        parser.error("bad environment: " + "; ".join(p.env_errors))
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_ca is not None and args.tls_cert is None:
        parser.error("--tls-ca needs --tls-cert and --tls-key")
    if args.connect_timeout_ms > 300_000:
        parser.error("--connect-timeout-ms is at most 300000")
    if args.host_token_file is None:
        args.host_token_file = default_host_token_file()
    return args
