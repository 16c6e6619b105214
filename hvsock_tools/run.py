"""``hvsock run -- PROGRAM ARGS...``: an unmodified AF_VSOCK program as a guest (or a host
program) of the emulated Hyper-V host.

``hvsock run`` finds the companion of the partition (``hvsock_tools.vsock_companion``, one per
partition and user, on the abstract socket ``@hvsock-run/<key>``) or starts it, then runs the
program with ``LD_PRELOAD`` set to the shim (``hvsock_tools._preload``) and
``HVSOCK_PRELOAD_SOCKET`` naming the companion, and exits with the program's status (128+N
when a signal N ended it, as a shell reports it). While it runs it holds the companion (a
``HOLD`` connection); a companion it started stops once no ``hvsock run`` holds it and no
connection or listener of any program is left, unless ``--keep-companion``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import os
import pathlib
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable
from typing import Any

from guest_client import find_token

from ._api import CliError

#: How often ``hvsock run`` tries again when another one started the companion at the same
#: moment (its "busy" answer) and that one is not answering yet.
_START_TRIES = 50


def preload_library() -> str:
    """Path of the compiled shim (an extension module that is never imported)."""
    spec = importlib.util.find_spec("hvsock_tools._preload")
    if spec is None or spec.origin is None or not os.path.exists(spec.origin):
        raise CliError(
            "FAILED_PRECONDITION",
            "the vsock shim hvsock_tools._preload is not built (pip install . or make build)",
        )
    return spec.origin


def add_cli_command(commands: Any, command: Callable[..., Any]) -> None:
    """Add ``run`` to ``hvsock``'s parser."""
    run = command(
        commands,
        "run",
        cli_run,
        "run an unmodified AF_VSOCK program as a guest of the emulated host (LD_PRELOAD)",
    )
    who = run.add_mutually_exclusive_group()
    who.add_argument(
        "--vm",
        metavar="NAME|ID",
        default=None,
        help="the VM: its GUID (token: --token or HVSOCK_TOKEN), or a name (the host creates "
        "or takes it over on attach, with --auto-create-vms); default: the environment "
        "(HVSOCK_VM_ID/HVSOCK_TOKEN, HVSOCK_VM_IDENTITY, HVSOCK_VM_NAME)",
    )
    who.add_argument(
        "--host-partition",
        action="store_true",
        help="run as a host program: vsock CIDs name VMs (hvsock vms list shows them)",
    )
    run.add_argument(
        "--host-token",
        default=None,
        metavar="TOKEN",
        help="the host partition's token (default: --token, HVSOCK_HOST_TOKEN, the token file)",
    )
    run.add_argument(
        "--keep-companion",
        action="store_true",
        help="leave the companion running after the program exits (it logs to a file then)",
    )
    run.add_argument("program", nargs=argparse.REMAINDER, metavar="-- PROGRAM ARGS")


def _is_guid(text: str) -> bool:
    try:
        uuid.UUID(text.strip("{}"))
    except ValueError:
        return False
    return True


def companion_environment(args: Any) -> tuple[dict[str, str], str, bool]:
    """(environment of the companion, the key of its partition, whether it is the host's)."""
    env = dict(os.environ)
    for name in ("LD_PRELOAD", "HVSOCK_PRELOAD_SOCKET"):
        env.pop(name, None)
    env["HVSOCK_HOST"] = args.host
    for flag, name in (("tls_ca", "HVSOCK_TLS_CA"), ("tls_cert", "HVSOCK_TLS_CERT")):
        if getattr(args, flag, None) is not None:
            env[name] = str(getattr(args, flag).resolve())
    if getattr(args, "tls_key", None) is not None:
        env["HVSOCK_TLS_KEY"] = str(args.tls_key.resolve())
    in_vm = env.get("HVSOCK_VM_ID") or env.get("HVSOCK_VM_IDENTITY") or env.get("HVSOCK_VM_NAME")
    is_host = bool(
        args.host_partition
        or (args.vm is None and not in_vm and (args.host_token or env.get("HVSOCK_HOST_TOKEN")))
    )
    if is_host:
        token = args.host_token or find_token(args.token)
        if not token:
            raise CliError("INVALID_ARGUMENT", "the host partition needs the host token")
        env["HVSOCK_HOST_TOKEN"] = token
        for name in ("HVSOCK_VM_ID", "HVSOCK_TOKEN", "HVSOCK_VM_IDENTITY", "HVSOCK_VM_NAME"):
            env.pop(name, None)
        spec = "host"
    elif args.vm is not None and _is_guid(args.vm):
        env["HVSOCK_VM_ID"] = args.vm
        token = args.token if args.token is not None else env.get("HVSOCK_TOKEN", "")
        env["HVSOCK_TOKEN"] = token
        spec = f"id:{args.vm.lower()}"
    elif args.vm is not None:
        # By name alone: an identity file in the environment names another VM's id.
        for name in ("HVSOCK_VM_ID", "HVSOCK_TOKEN", "HVSOCK_VM_IDENTITY"):
            env.pop(name, None)
        env["HVSOCK_VM_NAME"] = args.vm
        spec = f"name:{args.vm.lower()}"
    else:
        identity = env.get("HVSOCK_VM_IDENTITY", "")
        where = str(pathlib.Path(identity).resolve()) if identity else ""
        spec = f"env:{env.get('HVSOCK_VM_ID', '')}:{where}:{env.get('HVSOCK_VM_NAME', '')}"
    key = hashlib.sha256(f"{os.getuid()}\0{args.host}\0{spec}".encode()).hexdigest()[:16]
    return env, key, is_host


def _hold(name: str) -> socket.socket | None:
    """A HOLD connection to the companion ``name``, or None when none answers there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect("\0" + name)
        sock.sendall(b"HOLD\n")
        if sock.recv(16) != b"HELD\n":
            raise ConnectionRefusedError("not a companion")
    except OSError:
        sock.close()
        return None
    return sock


def _runtime_dir() -> pathlib.Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/hvsock-run-{os.getuid()}"
    path = pathlib.Path(base)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def start_companion(name: str, env: dict[str, str], *, is_host: bool, keep: bool) -> socket.socket:
    """Hold the companion ``name``, starting it first when none answers."""
    for _ in range(_START_TRIES):
        held = _hold(name)
        if held is not None:
            return held
        command = [sys.executable, "-m", "hvsock_tools.vsock_companion", "--name", name]
        if is_host:
            command.append("--host-partition")
        if not keep:
            command.append("--exit-when-unused")
        stderr: Any = None  # ours: its warnings show where the program's errors do
        if keep:
            stderr = open(_runtime_dir() / f"{name.replace('/', '-')}.log", "ab")  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                start_new_session=True,  # a Ctrl-C for the program is not for it
                text=True,
            )
        finally:
            if keep:
                stderr.close()
        assert proc.stdout is not None
        with proc.stdout:
            line = proc.stdout.readline().strip()
        if line.startswith("ready"):
            held = _hold(name)
            if held is not None:
                return held
            raise CliError("UNAVAILABLE", "the companion started but does not answer")
        if line.startswith("busy"):
            proc.wait()
            continue  # another hvsock run started it a moment ago: hold that one
        proc.wait()
        raise CliError("UNAVAILABLE", f"the companion did not start: {line or 'no answer'}")
    raise CliError("UNAVAILABLE", f"no companion answers on @{name}")


def program_environment(name: str, library: str) -> dict[str, str]:
    env = dict(os.environ)
    preload = env.get("LD_PRELOAD", "")
    env["LD_PRELOAD"] = f"{library} {preload}".strip() if library not in preload else preload
    env["HVSOCK_PRELOAD_SOCKET"] = "@" + name
    return env


def cli_run(args: Any, client: Any) -> None:
    program = list(args.program)
    if program and program[0] == "--":
        program = program[1:]
    if not program:
        raise CliError("INVALID_ARGUMENT", "no program given: hvsock run [options] -- PROGRAM")
    library = preload_library()
    env, key, is_host = companion_environment(args)
    name = f"hvsock-run/{key}"
    held = start_companion(name, env, is_host=is_host, keep=args.keep_companion)
    with held:
        try:
            proc = subprocess.Popen(program, env=program_environment(name, library))
        except OSError as exc:
            print(f"hvsock: run: {program[0]}: {exc.strerror}", file=sys.stderr)
            raise SystemExit(127 if isinstance(exc, FileNotFoundError) else 126) from None

        def forward(signum: int, frame: Any) -> None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)

        # The terminal's Ctrl-C reaches the program itself (same process group); the others
        # are passed on. Handlers, not SIG_IGN: the program must not inherit an ignore.
        signal.signal(signal.SIGINT, lambda *_: None)
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1):
            signal.signal(signum, forward)
        status = proc.wait()
    raise SystemExit(status if status >= 0 else 128 - status)
