"""The error comments of ``protos/hvsock/v1/hvsock.proto`` say what the host really raises.

The facts live in the error classes (``host_service/core/errors.py``,
``hvsock_common/errors.py``: each class's ``status`` and ``errno``) and in the one mapping to
gRPC (``host_service/status.py``). The proto describes them twice, in prose:

* the summary near the top: one line per status code, listing items "what happened (ERRNO)"
  separated by ";";
* per request/RPC "Errors:" lists: ``STATUS``, ``STATUS/ERRNO`` or ``STATUS (why)``.

This test parses both and checks them against the classes, so a comment cannot drift from the
code again (it once said FAILED_PRECONDITION for an unregistered service under the strict
registry and EACCES for a guest-to-guest connect; the host raises PERMISSION_DENIED/EACCES and
PERMISSION_DENIED/ENETUNREACH).
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

import grpc
import pytest

from host_service import status as status_module
from host_service.core import errors

pytestmark = pytest.mark.unit

PROTO = Path(__file__).resolve().parents[3] / "protos" / "hvsock" / "v1" / "hvsock.proto"

GRPC_NAMES = frozenset(code.name for code in grpc.StatusCode) - {"OK"}
_STATUS_RE = "|".join(sorted(GRPC_NAMES, key=len, reverse=True))

# Every summary item (normalised text before its "(ERRNO)") and the class whose status and
# errno it describes. Every item of the summary must be here and every entry in the summary.
SUMMARY_ITEMS: dict[str, type[errors.HvError]] = {
    "malformed GUID": errors.BadAddress,
    "field out of range or a request out of order, e.g. a first attach request that is not "
    "hello": errors.InvalidArgument,
    "a VM id the caller cannot reach, e.g. PARENT from the host": errors.NetworkUnreachable,
    "missing or wrong token": errors.Unauthenticated,
    "acting on another partition's object": errors.PermissionDenied,
    "guest-to-guest connect": errors.GuestToGuestRefused,
    "strict registry and the service is unregistered": errors.ServiceNotRegistered,
    "unknown VM id, channel, listener or service": errors.NotFound,
    "connect to a VM that does not exist or is off": errors.HostUnreachable,
    "VM id or partition name taken": errors.AlreadyExists,
    "address in use": errors.AddressInUse,
    "the object's state forbids the request, e.g. pause a paused VM": errors.InvalidState,
    "partition not running": errors.PartitionNotRunning,
    "a channel request its state does not allow, which closes the channel": errors.ProtocolError,
    "shutdown or close before the connect completed": errors.NotConnected,
    "max_socket_number reached": errors.NoBuffers,
    "max_sessions_per_partition attach streams open already": errors.TooManySessions,
    "max_partitions VMs exist already": errors.TooManyPartitions,
    "no unused local service id or VM id left": errors.AddressNotAvailable,
    "connection refused: nobody listens or the backlog is full": errors.ConnectionRefused,
    "channel reset/rescinded": errors.ConnectionReset,
    "connect timed out": errors.ConnectTimedOut,
    "a ring's contents are impossible: corrupt ring memory": errors.RingCorrupt,
}

# Per-request "Errors:" items with a reason in parentheses that name a specific core error:
# (exact reason text, normalised) -> class. Each must occur, with the class's status and errno.
DOCUMENTED_REASONS: dict[str, type[errors.HvError]] = {
    "strict registry: the service is unregistered": errors.ServiceNotRegistered,  # Listen
    "guest to guest": errors.GuestToGuestRefused,  # Connect
    "VM not running": errors.PartitionNotRunning,  # Attach
    "unknown VM id": errors.NotFound,  # Attach
    "no VM id and the host does not create VMs on attach": errors.PermissionDenied,  # Attach
    "not running": errors.InvalidState,  # PausePartition
    "not paused": errors.InvalidState,  # ResumePartition
    "the host partition": errors.InvalidState,  # DeletePartition
    "duration 0 or > 600000 ms": errors.InvalidArgument,  # fault injection
}


def _classes() -> list[type[errors.HvError]]:
    found: list[type[errors.HvError]] = []
    todo: list[type[errors.HvError]] = [errors.HvError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return [c for c in found if c.__module__ in (errors.__name__, "hvsock_common.errors")]


CLASSES = [c for c in _classes() if c is not errors.HvError]
PRODUCED = {(c.status, errno.errorcode[c.errno]) for c in CLASSES}
PRODUCED_STATUSES = {status for status, _ in PRODUCED}


def _comment_blocks() -> list[tuple[int, str]]:
    """Each run of consecutive ``//`` lines as (first line number, text joined by spaces)."""
    blocks: list[tuple[int, str]] = []
    current: list[str] = []
    start = 0
    for lineno, line in enumerate(PROTO.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("//"):
            if not current:
                start = lineno
            current.append(stripped[2:])
        elif current:
            blocks.append((start, " ".join(current)))
            current = []
    if current:
        blocks.append((start, " ".join(current)))
    return blocks


def _norm(text: str) -> str:
    return " ".join(text.split())


def _summary() -> dict[str, list[tuple[str, str]]]:
    """The summary: status name -> [(item text, errno name)]."""
    lines = PROTO.read_text().splitlines()
    intro = next(i for i, line in enumerate(lines) if "The status codes used" in line)
    first = next(
        i for i in range(intro, len(lines)) if re.match(rf"//   ({_STATUS_RE}) ", lines[i])
    )
    entries: dict[str, str] = {}
    status = ""
    for line in lines[first:]:
        if not line.startswith("//"):
            break
        m = re.match(rf"//   ({_STATUS_RE})\s+(.*)$", line)
        if m:
            status = m.group(1)
            assert status not in entries, f"{status} twice in the proto's error summary"
            entries[status] = m.group(2)
        else:
            assert status and re.match(r"// {4,}\S", line), f"summary line not understood: {line!r}"
            entries[status] += " " + line[2:].strip()
    parsed: dict[str, list[tuple[str, str]]] = {}
    for status, text in entries.items():
        parsed[status] = []
        for item in text.split(";"):
            m = re.fullmatch(r"\s*(.*?)\s*\((E[A-Z0-9]+)\)\s*", item)
            assert m, f"summary item of {status} without a final (ERRNO): {item!r}"
            parsed[status].append((_norm(m.group(1)), m.group(2)))
    return parsed


def _errors_items() -> list[tuple[int, str, str | None, str | None]]:
    """Every ``STATUS[/ERRNO][ (reason)]`` outside the summary: (line, status, errno, reason)."""
    item = re.compile(
        rf"\b({_STATUS_RE})\b(?:/(E[A-Z0-9]+))?(?:\s+with\s+(E[A-Z0-9]+))?(?:\s*\(([^()]*)\))?"
    )
    found = []
    for start, text in _comment_blocks():
        if "The status codes used" in text:
            text = text[: text.index("The status codes used")]  # the summary is checked apart
        for m in item.finditer(text):
            found.append((start, m.group(1), m.group(2) or m.group(3), m.group(4)))
    return found


def test_summary_items_name_the_status_and_errno_the_host_raises() -> None:
    summary = _summary()
    seen: set[str] = set()
    wrong = []
    for status, items in summary.items():
        for text, err in items:
            cls = SUMMARY_ITEMS.get(text)
            assert cls is not None, f"summary item not in SUMMARY_ITEMS: {status}: {text!r}"
            seen.add(text)
            if (status, err) != (cls.status, errno.errorcode[cls.errno]):
                wrong.append(
                    f"{text!r}: proto {status}/{err}, {cls.__name__} raises "
                    f"{cls.status}/{errno.errorcode[cls.errno]}"
                )
    assert not wrong, "\n".join(wrong)
    assert not SUMMARY_ITEMS.keys() - seen, f"not in the summary: {SUMMARY_ITEMS.keys() - seen}"


def test_summary_covers_every_error_class_and_status() -> None:
    documented = set(SUMMARY_ITEMS.values())
    missing = sorted(c.__name__ for c in CLASSES if c not in documented)
    assert not missing, f"error classes the proto's summary does not describe: {missing}"
    assert set(_summary()) == PRODUCED_STATUSES - {"INTERNAL"}


def test_every_status_in_a_comment_is_one_the_host_produces() -> None:
    items = _errors_items()
    assert len(items) > 40  # the parser found the per-request lists
    bad = [(line, s) for line, s, _, _ in items if s not in PRODUCED_STATUSES]
    assert not bad, f"statuses no error class has (proto line, status): {bad}"
    assert status_module.STATUS_CODES.keys() >= PRODUCED_STATUSES


def test_every_status_errno_pair_in_a_comment_is_one_the_host_produces() -> None:
    bad = [(line, s, e) for line, s, e, _ in _errors_items() if e and (s, e) not in PRODUCED]
    assert not bad, f"(proto line, status, errno) that no error class raises: {bad}"


@pytest.mark.parametrize("reason", sorted(DOCUMENTED_REASONS))
def test_documented_reason_names_the_raised_status_and_errno(reason: str) -> None:
    cls = DOCUMENTED_REASONS[reason]
    matches = [(line, s, e) for line, s, e, r in _errors_items() if r and _norm(r) == reason]
    assert matches, f"no 'STATUS ({reason})' in the proto's comments"
    for line, status, err in matches:
        assert status == cls.status, f"proto line ~{line}: {status} ({reason}); host: {cls.status}"
        if cls.status in ("PERMISSION_DENIED", "FAILED_PRECONDITION"):
            # Statuses whose errno differs by cause: the comment must name it.
            assert err == errno.errorcode[cls.errno], (
                f"proto line ~{line}: {status}/{err} ({reason}); host: "
                f"{cls.status}/{errno.errorcode[cls.errno]}"
            )
        elif err is not None:
            assert err == errno.errorcode[cls.errno]
