"""The ``hvsock`` command-line tool, run as the real console script against a real host."""

from __future__ import annotations

import json
import os
import pathlib
import re
import selectors
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from hvsock.v1 import hvsock_pb2
from hvsock_common.addresses import cid_for_vm_id

from .hostproc import HostProcess, run_host
from .rawclient import RawPartition, RelayStream
from .test_host_badinput import wait_for_sessions

pytestmark = pytest.mark.integration

HVSOCK = pathlib.Path(sys.executable).parent / "hvsock"
SERVICE = "3049197c-facb-11e6-bd58-64006a7986d3"
PARENT = "a42e7cda-d03f-480c-9cc2-a4de20abb878"
WILDCARD = "00000000-0000-0000-0000-000000000000"
GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostProcess]:
    with run_host(tmp_path_factory.mktemp("cli-host")) as process:
        yield process


@pytest.fixture(scope="module")
def clean_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """No token or host from the caller's environment, and an empty config directory, so the
    token file of a real hvsock-host on this machine is never picked up."""
    config = tmp_path_factory.mktemp("config")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HVSOCK_")}
    env["XDG_CONFIG_HOME"] = str(config)
    return env


def hvsock(
    env: dict[str, str], *args: str, extra_env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HVSOCK), *args],
        env={**env, **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class Cli:
    """``hvsock --host <the test host> --token <its token> ...``."""

    def __init__(self, host: HostProcess, env: dict[str, str]) -> None:
        self.host, self.env = host, env

    def run(self, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        return hvsock(
            self.env,
            "--host",
            self.host.target,
            "--token",
            self.host.token if token is None else token,
            *args,
        )

    def ok(self, *args: str) -> str:
        result = self.run(*args)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        assert result.stderr == ""
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok("--json", *args))

    def fails(self, status: str, *args: str, token: str | None = None) -> str:
        result = self.run(*args, token=token)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert result.stdout == ""
        assert result.stderr.startswith(f"hvsock: {status}: "), result.stderr
        assert result.stderr.count("\n") == 1  # one line, no traceback
        return result.stderr

    def usage_error(self, *args: str) -> str:
        result = self.run(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "usage: hvsock" in result.stderr
        return result.stderr


@pytest.fixture
def cli(host: HostProcess, clean_env: dict[str, str]) -> Cli:
    return Cli(host, clean_env)


def new_vm(cli: Cli, name: str, *extra: str) -> dict[str, str]:
    created: dict[str, str] = cli.json("vms", "create", "--name", name, *extra)
    return created


# ---------------------------------------------------------------------------------------------
# info, token, connection
# ---------------------------------------------------------------------------------------------


def test_info_needs_no_token(cli: Cli, host: HostProcess, clean_env: dict[str, str]) -> None:
    result = hvsock(clean_env, "--host", host.target, "info")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("hvsock-emulator ")
    assert re.search(r"^\s+max_socket_number\s+1024$", result.stdout, re.M)
    assert re.search(r"^\s+strict_registry\s+false$", result.stdout, re.M)
    info = json.loads(hvsock(clean_env, "--host", host.target, "--json", "info").stdout)
    assert info["limits"]["max_socket_number"] == 1024
    assert info["limits"]["send_ring_page"] == 2 and info["limits"]["recv_ring_page"] == 3
    assert isinstance(info["version"], str) and info["version"]


def test_options_may_follow_the_command(host: HostProcess, clean_env: dict[str, str]) -> None:
    env = {**clean_env, "HVSOCK_HOST": host.target}  # --host from the environment
    result = hvsock(env, "vms", "list", "--json", "--token", host.token)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["partitions"][0]["host"] is True


def test_token_from_env_then_file(
    host: HostProcess, clean_env: dict[str, str], tmp_path: pathlib.Path
) -> None:
    base = ("--host", host.target, "--json", "vms", "list")
    by_env = hvsock(clean_env, *base, extra_env={"HVSOCK_HOST_TOKEN": host.token})
    assert by_env.returncode == 0, by_env.stderr

    # The file hvsock-host writes a generated token to: $XDG_CONFIG_HOME/hvsock/host-token.
    config = tmp_path / "config"
    (config / "hvsock").mkdir(parents=True)
    (config / "hvsock" / "host-token").write_text(host.token + "\n")
    by_file = hvsock(clean_env, *base, extra_env={"XDG_CONFIG_HOME": str(config)})
    assert by_file.returncode == 0, by_file.stderr

    other = tmp_path / "elsewhere"
    other.write_text(host.token)
    by_named_file = hvsock(clean_env, *base, extra_env={"HVSOCK_HOST_TOKEN_FILE": str(other)})
    assert by_named_file.returncode == 0, by_named_file.stderr

    # --token wins over the environment.
    wrong = hvsock(
        clean_env, "--token", "wrong", *base, extra_env={"HVSOCK_HOST_TOKEN": host.token}
    )
    assert wrong.returncode == 1
    assert wrong.stderr.startswith("hvsock: UNAUTHENTICATED: ")


def test_wrong_or_missing_token(cli: Cli, host: HostProcess, clean_env: dict[str, str]) -> None:
    message = cli.fails("UNAUTHENTICATED", "vms", "list", token="not-the-token")
    assert "x-hvsock-token" in message
    missing = hvsock(clean_env, "--host", host.target, "vms", "list")
    assert missing.returncode == 1
    assert missing.stderr.startswith("hvsock: UNAUTHENTICATED: ")


def test_unreachable_host(clean_env: dict[str, str], tmp_path: pathlib.Path) -> None:
    result = hvsock(clean_env, "--host", f"unix:{tmp_path}/nobody.sock", "--timeout", "2", "info")
    assert result.returncode == 1
    assert re.match(r"hvsock: (UNAVAILABLE|DEADLINE_EXCEEDED): ", result.stderr), result.stderr


def test_usage_errors_exit_2(cli: Cli) -> None:
    assert "required" in cli.usage_error()
    assert "--name" in cli.usage_error("vms", "create")
    assert "invalid choice" in cli.usage_error(
        "vms", "create", "--name", "x", "--personality", "bsd"
    )
    assert "not a channel id" in cli.usage_error("rescind", "seven")
    assert "not a channel id" in cli.usage_error("stall", "0", "--ms", "5")
    assert "--ms" in cli.usage_error("stall", "1")
    assert "must not be negative" in cli.usage_error("stall", "1", "--ms", "-5")
    assert "invalid choice" in cli.usage_error("stall", "1", "--ms", "5", "--direction", "up")
    assert "invalid" in cli.usage_error("events", "--replay", "many")
    assert "--tls-cert and --tls-key go together" in cli.usage_error(
        "--tls-ca", "/dev/null", "--tls-cert", "/dev/null", "info"
    )


# ---------------------------------------------------------------------------------------------
# vms
# ---------------------------------------------------------------------------------------------


def test_vms_create_prints_id_and_token(cli: Cli) -> None:
    created = new_vm(cli, "json-vm")
    assert set(created) == {"vm_id", "token"}
    assert GUID.match(created["vm_id"]) and len(created["token"]) >= 16

    text = cli.ok("vms", "create", "--name", "text-vm")
    lines = dict(line.split(": ", 1) for line in text.splitlines())
    assert GUID.match(lines["vm_id"]) and lines["token"]

    # The printed token lets the VM attach.
    guest = RawPartition(
        cli.host.target, hvsock_pb2.Hello(vm_id=lines["vm_id"], token=lines["token"])
    )
    try:
        assert guest.welcome.vm_id == lines["vm_id"]
        assert guest.welcome.name == "text-vm"
    finally:
        guest.close()


def test_vms_create_with_id_and_personality(cli: Cli) -> None:
    vm_id = str(uuid.uuid4())
    created = new_vm(cli, "win", "--vm-id", "{" + vm_id.upper() + "}", "--personality", "windows")
    assert created["vm_id"] == vm_id  # canonical form
    got = cli.json("vms", "get", vm_id)
    assert got == {
        "vm_id": vm_id,
        "name": "win",
        "personality": "windows",
        "state": "running",
        "host": False,
        "attached": False,
        "channel_count": 0,
        "listener_count": 0,
        "session_count": 0,
        "cid": cid_for_vm_id(vm_id),
    }
    assert "ALREADY_EXISTS" in cli.fails(
        "ALREADY_EXISTS", "vms", "create", "--name", "again", "--vm-id", vm_id
    )


def test_vms_list_table_and_json(cli: Cli) -> None:
    created = new_vm(cli, "listed")
    partitions = cli.json("vms", "list")["partitions"]
    assert partitions[0]["host"] is True and partitions[0]["vm_id"] == PARENT
    assert {"vm_id": created["vm_id"], "name": "listed"}.items() <= next(
        p for p in partitions if p["vm_id"] == created["vm_id"]
    ).items()
    table = cli.ok("vms", "list").splitlines()
    assert table[0].split() == [
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
    ]
    assert table[1].split()[:3] == [PARENT, "host", "host"]
    row = next(line for line in table if line.startswith(created["vm_id"]))
    assert row.split() == [
        created["vm_id"], "vm", "listed", "linux", "running", "no", "0", "0", "0",
        str(cid_for_vm_id(created["vm_id"])),
    ]  # fmt: skip
    assert table[1].split()[-1] == "2"  # the host partition: VMADDR_CID_HOST


def test_vms_list_counts_sessions(cli: Cli) -> None:
    """Two processes of one VM attached: SESSIONS 2, and each session in the events."""
    created = new_vm(cli, "two-sessions")
    vm_id = created["vm_id"]
    hello = hvsock_pb2.Hello(vm_id=vm_id, token=created["token"])
    first = RawPartition(cli.host.target, hello)
    second = RawPartition(cli.host.target, hello)
    try:
        listed = next(p for p in cli.json("vms", "list")["partitions"] if p["vm_id"] == vm_id)
        assert listed["attached"] is True and listed["session_count"] == 2
        assert cli.json("vms", "get", vm_id)["session_count"] == 2
        row = next(line for line in cli.ok("vms", "list").splitlines() if line.startswith(vm_id))
        assert row.split() == [
            vm_id, "vm", "two-sessions", "linux", "running", "yes", "0", "0", "2",
            str(cid_for_vm_id(vm_id)),
        ]  # fmt: skip
        assert cli.ok("vms", "get", vm_id).splitlines()[1].split()[-2] == "2"

        # Since the VM was created: created, attached, and one session_opened per attachment.
        replay = ("events", "--replay", "4", "--count", "4")
        events = [json.loads(line) for line in cli.ok("--json", *replay).splitlines()]
        assert [e["kind"] for e in events if e["vm_id"] == vm_id] == [
            "created", "attached", "session_opened", "session_opened"
        ], events  # fmt: skip
        opened = [e for e in events if e["kind"] == "session_opened"]
        sessions = [e["session_id"] for e in opened]
        assert all(sessions) and len(set(sessions)) == 2, events
        assert next(e for e in events if e["kind"] == "created")["session_id"] == 0
        # The table shows a session id as sN, and "-" where an event has none.
        text = {line.split()[1]: line.split() for line in cli.ok(*replay).splitlines()}
        assert text["created"][2:4] == [vm_id, "-"] and text["created"][4] == "-"
        last = opened[-1]
        assert text["session_opened"][2:5] == [vm_id, "-", f"s{last['session_id']}"]
        assert " ".join(text["session_opened"][5:]) == last["detail"]
    finally:
        second.close()
        first.close()
    wait_for_sessions(cli.host, vm_id, 0)  # their events are in before the next test starts


def test_vms_pause_resume_stop_delete(cli: Cli) -> None:
    vm_id = new_vm(cli, "lifecycle")["vm_id"]
    assert cli.json("vms", "pause", vm_id)["state"] == "paused"
    assert "FAILED_PRECONDITION" in cli.fails("FAILED_PRECONDITION", "vms", "pause", vm_id)
    assert cli.json("vms", "resume", vm_id)["state"] == "running"
    stopped = cli.ok("vms", "stop", vm_id)
    assert re.search(rf"^{vm_id}\s+vm\s+lifecycle\s+linux\s+off\s", stopped, re.M), stopped
    assert cli.json("vms", "resume", vm_id)["state"] == "running"
    assert cli.ok("vms", "delete", vm_id).strip() == f"deleted {vm_id}"
    cli.fails("NOT_FOUND", "vms", "get", vm_id)
    assert cli.json("vms", "list")["partitions"][-1]["vm_id"] != vm_id
    second = new_vm(cli, "json-delete")["vm_id"]
    assert cli.json("vms", "delete", second) == {"vm_id": second, "deleted": True}


def test_vms_and_channels_take_a_vm_name_for_its_id(cli: Cli) -> None:
    vm_id = new_vm(cli, "by-name")["vm_id"]
    # Names are unique on a host ignoring case, and looked up so.
    assert cli.json("vms", "get", "BY-NAME")["vm_id"] == vm_id
    assert cli.json("vms", "pause", "by-name")["state"] == "paused"
    assert cli.json("vms", "resume", "By-Name")["state"] == "running"
    assert cli.json("channels", "--vm", "by-name") == {"channels": []}
    assert cli.json("vms", "delete", "by-name") == {"vm_id": vm_id, "deleted": True}
    gone = cli.fails("NOT_FOUND", "vms", "get", "by-name")
    assert "no VM with id or name 'by-name'" in gone
    assert "no VM with id or name 'nope'" in cli.fails("NOT_FOUND", "channels", "--vm", "nope")


def test_vms_bad_input(cli: Cli) -> None:
    # Not a VM id: a name, and no VM has it.
    assert "no VM with id or name 'not-a-guid'" in cli.fails(
        "NOT_FOUND", "vms", "get", "not-a-guid"
    )
    assert "not a valid GUID" in cli.fails(
        "INVALID_ARGUMENT", "vms", "create", "--name", "x", "--vm-id", "1234"
    )
    unknown = str(uuid.uuid4())
    for action in ("get", "delete", "pause", "resume", "stop"):
        assert unknown in cli.fails("NOT_FOUND", "vms", action, unknown)
    result = cli.run("vms", "delete", PARENT)
    assert result.returncode == 1
    assert "host partition cannot be deleted" in result.stderr
    cli.fails("INVALID_ARGUMENT", "vms", "create", "--name", "")


def test_deleting_the_host_partition_is_a_failed_precondition(cli: Cli) -> None:
    cli.fails("FAILED_PRECONDITION", "vms", "delete", PARENT)


# ---------------------------------------------------------------------------------------------
# services
# ---------------------------------------------------------------------------------------------


def test_services_register_list_unregister(cli: Cli) -> None:
    service = str(uuid.uuid4())
    registered = cli.json("services", "register", service.upper(), "--name", "My Service")
    assert registered == {"service_id": service, "element_name": "My Service"}
    assert {"service_id": service, "element_name": "My Service"} in cli.json("services", "list")[
        "services"
    ]
    table = cli.ok("services", "list").splitlines()
    assert table[0].split() == ["SERVICE_ID", "ELEMENT_NAME"]
    assert f"{service}  My Service" in table
    assert cli.ok("services", "unregister", service).strip() == f"unregistered {service}"
    assert service not in cli.ok("services", "list")
    cli.fails("NOT_FOUND", "services", "unregister", service)
    cli.fails("INVALID_ARGUMENT", "services", "register", "xyz", "--name", "bad")
    cli.fails("INVALID_ARGUMENT", "services", "unregister", "xyz")
    assert "--name" in cli.usage_error("services", "register", service)


def test_registering_a_service_again_updates_its_name(cli: Cli) -> None:
    service = str(uuid.uuid4())
    cli.ok("services", "register", service, "--name", "once")
    again = cli.json("services", "register", service, "--name", "twice")
    assert again == {"service_id": service, "element_name": "twice"}


# ---------------------------------------------------------------------------------------------
# channels, stall, rescind, events
# ---------------------------------------------------------------------------------------------


class Pair:
    """A VM and the host partition with one open relay channel between them."""

    def __init__(self, cli: Cli, service: str) -> None:
        created = new_vm(cli, f"chan-vm-{uuid.uuid4().hex[:8]}")  # names are unique
        self.vm_id = created["vm_id"]
        target = cli.host.target
        self.guest = RawPartition(
            target, hvsock_pb2.Hello(vm_id=self.vm_id, token=created["token"])
        )
        self.root = RawPartition(target, hvsock_pb2.Hello(host=True, token=cli.host.token))
        listening = self.root.request(
            listen=hvsock_pb2.Listen(
                address=hvsock_pb2.Address(vm_id=self.vm_id, service_id=service)
            )
        )
        assert listening.WhichOneof("kind") == "listening", listening
        connect = self.guest.send(
            connect=hvsock_pb2.Connect(remote=hvsock_pb2.Address(vm_id=PARENT, service_id=service))
        )
        offer = self.root.event().offer
        accepted = self.root.request(accept=hvsock_pb2.Accept(channel_id=offer.channel.channel_id))
        assert accepted.WhichOneof("kind") == "opened", accepted
        connected = self.guest.answer(connect)
        assert connected.WhichOneof("kind") == "opened", connected
        self.channel_id = connected.opened.channel_id
        self.guest_relay = RelayStream(self.guest, self.channel_id)
        self.root_relay = RelayStream(self.root, self.channel_id)

    def close(self) -> None:
        for thing in (self.guest_relay, self.root_relay, self.guest, self.root):
            thing.close()


@pytest.fixture
def pair(cli: Cli) -> Iterator[Pair]:
    p = Pair(cli, str(uuid.uuid4()))
    try:
        yield p
    finally:
        p.close()


def test_channels_table_and_json(cli: Cli, pair: Pair) -> None:
    pair.guest_relay.send_all(b"x" * 1000)
    channels = cli.json("channels", "--vm", pair.vm_id)["channels"]
    assert len(channels) == 1
    channel = channels[0]
    assert channel["channel_id"] == pair.channel_id
    assert channel["state"] == "open"
    assert channel["connector"]["vm_id"] == pair.vm_id
    assert channel["listener"]["vm_id"] == PARENT
    assert channel["connector_data_path"] == channel["listener_data_path"] == "relay"
    assert channel["to_listener"]["ring_pages"] == 2 and channel["to_connector"]["ring_pages"] == 3
    assert channel["to_listener"]["bytes"] >= 1000
    assert 0 <= channel["to_listener"]["ring_fill"] <= 1
    assert channel["created"].endswith("Z")

    table = cli.ok("channels").splitlines()
    assert table[0].split() == [
        "ID",
        "STATE",
        "CONNECTOR",
        "LISTENER",
        "PATH(C/L)",
        "BYTES->L",
        "BYTES->C",
        "RING->L",
        "RING->C",
    ]
    row = next(line.split() for line in table[1:] if line.split()[0] == str(pair.channel_id))
    assert row[1] == "open"
    assert row[2] == f"{pair.vm_id}:{channel['connector']['service_id']}"
    assert row[4] == "relay/relay"
    assert re.fullmatch(r"\d+/4096", row[7]) and re.fullmatch(r"\(\d+%\)", row[8]), row
    assert re.fullmatch(r"\d+/8192", row[9]), row

    other = new_vm(cli, "no-channels")["vm_id"]
    assert cli.json("channels", "--vm", other) == {"channels": []}
    assert cli.ok("channels", "--vm", other).splitlines()[1:] == []
    cli.fails("NOT_FOUND", "channels", "--vm", "nope")  # no VM has that name


def test_stall(cli: Cli, pair: Pair) -> None:
    out = cli.ok("stall", str(pair.channel_id), "--ms", "200", "--direction", "to-listener")
    assert out.strip() == f"stalled channel {pair.channel_id} (to-listener) for 200 ms"
    assert cli.json("stall", str(pair.channel_id), "--ms", "50") == {
        "channel_id": pair.channel_id,
        "direction": "both",
        "ms": 50,
    }
    cli.fails("INVALID_ARGUMENT", "stall", str(pair.channel_id), "--ms", "0")
    cli.fails("INVALID_ARGUMENT", "stall", str(pair.channel_id), "--ms", "600001")
    assert "no channel" in cli.fails("NOT_FOUND", "stall", "987654321", "--ms", "10")


def test_rescind(cli: Cli, pair: Pair) -> None:
    out = cli.ok("rescind", str(pair.channel_id), "--reason", "cli test")
    assert out.strip() == f"rescinded channel {pair.channel_id}"
    notice = pair.guest.event().notice
    assert notice.channel_id == pair.channel_id
    assert notice.kind == hvsock_pb2.ChannelNotice.KIND_RESCINDED
    assert notice.reason == "cli test"
    assert "no channel" in cli.fails("NOT_FOUND", "rescind", "987654321")


def test_rescind_json(cli: Cli, pair: Pair) -> None:
    assert cli.json("rescind", str(pair.channel_id)) == {
        "channel_id": pair.channel_id,
        "rescinded": True,
    }
    assert pair.guest.event().notice.kind == hvsock_pb2.ChannelNotice.KIND_RESCINDED


def test_events_replay(cli: Cli) -> None:
    vm_id = new_vm(cli, "evented")["vm_id"]
    out = cli.ok("--json", "events", "--replay", "1000", "--count", "1")
    lines = out.splitlines()
    assert len(lines) == 1
    first = json.loads(lines[0])
    assert set(first) == {"time", "kind", "vm_id", "channel_id", "detail", "session_id"}
    # The most recent event is the VM just created (nothing else happens on this host now).
    last = cli.ok("events", "--json", "--replay", "1", "--count", "1").strip().splitlines()
    assert len(last) == 1
    assert json.loads(last[0])["kind"] == "created" and json.loads(last[0])["vm_id"] == vm_id
    for number in range(3):  # at least three events to replay, whatever ran before
        new_vm(cli, f"evented-{number}")
    text = cli.ok("events", "--replay", "3", "--count", "3").splitlines()
    assert len(text) == 3
    assert all(re.match(r"^\d{4}-\d\d-\d\dT\S+Z\s+\S+", line) for line in text), text


def test_events_follow_until_ctrl_c(cli: Cli) -> None:
    proc = subprocess.Popen(
        [str(HVSOCK), "--host", cli.host.target, "--token", cli.host.token, "events", "--json"],
        env=cli.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        name = f"followed-{uuid.uuid4().hex[:8]}"
        # The stream may not be watching yet when the first VM is created: create until seen.
        seen: dict[str, Any] | None = None
        created: list[str] = []
        selector = selectors.DefaultSelector()
        selector.register(proc.stdout, selectors.EVENT_READ)
        for number in range(20):
            created.append(new_vm(cli, f"{name}-{number}")["vm_id"])
            if selector.select(timeout=1):
                line = proc.stdout.readline()
                seen = json.loads(line)
                break
        assert seen is not None, "no event arrived"
        assert seen["vm_id"] in created and seen["kind"] == "created"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        assert proc.stderr is not None and proc.stderr.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


# ---------------------------------------------------------------------------------------------
# TLS
# ---------------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: pathlib.Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(directory: pathlib.Path) -> None:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=hvsock test CA",
        cwd=directory,
    )  # fmt: skip
    (directory / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", f"/CN={name}",
            cwd=directory,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", "-extfile", "san.ext",
            cwd=directory,
        )  # fmt: skip


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_mutual_tls(tmp_path: pathlib.Path, clean_env: dict[str, str]) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    make_pki(pki)
    flags = ("--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"))
    with run_host(tmp_path, *flags, "--tls-ca", str(pki / "ca.pem")) as tls_host:
        serving = next(line for line in tls_host.log if "serving on" in line)
        match = re.search(r"serving on 127\.0\.0\.1:(\d+)", serving)
        assert match, serving
        target = f"127.0.0.1:{match.group(1)}"
        base = ("--host", target, "--token", tls_host.token, "--timeout", "5")
        client = ("--tls-cert", str(pki / "client.pem"), "--tls-key", str(pki / "client.key"))
        ca = ("--tls-ca", str(pki / "ca.pem"))

        ok = hvsock(clean_env, *base, *ca, *client, "--json", "vms", "list")
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["partitions"][0]["host"] is True
        by_name = hvsock(
            clean_env,
            "--host",
            f"localhost:{match.group(1)}",
            "--token",
            tls_host.token,
            *ca,
            *client,
            "info",
        )
        assert by_name.returncode == 0, by_name.stderr

        no_client_cert = hvsock(clean_env, *base, *ca, "vms", "list")
        assert no_client_cert.returncode == 1
        assert no_client_cert.stderr.startswith("hvsock: UNAVAILABLE: "), no_client_cert.stderr
        plaintext = hvsock(clean_env, *base, "vms", "list")
        assert plaintext.returncode == 1
        assert plaintext.stderr.startswith("hvsock: UNAVAILABLE: "), plaintext.stderr
        missing = hvsock(clean_env, *base, "--tls-ca", str(pki / "nope.pem"), "info")
        assert missing.returncode == 1
        assert "nope.pem" in missing.stderr
