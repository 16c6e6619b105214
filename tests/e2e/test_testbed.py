"""The docker-compose testbed, for real: containers, both data paths, faults, scaling.

The tests share one compose project and run in file order (each leaves the testbed as the next
expects: every VM attached and echoing).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
import time
import urllib.request
from typing import Any

import pytest

from .compose import ROOT, ComposeProject, ok_results, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

HOST_ID = "a42e7cda-d03f-480c-9cc2-a4de20abb878"


def _vms(bed: ComposeProject) -> dict[str, dict[str, Any]]:
    """name -> partition, for every VM (not the host)."""
    return {p["name"]: p for p in bed.hvsock("vms", "list")["partitions"] if not p["host"]}


def _echo_vms(bed: ComposeProject) -> dict[str, dict[str, Any]]:
    """The VMs that run the echo workload (vm-linux and vm-windows replicas; not vm-web)."""
    return {n: p for n, p in _vms(bed).items() if n.startswith(("vm-linux-", "vm-windows-"))}


def _vm_named(bed: ComposeProject, prefix: str) -> dict[str, Any]:
    matches = [p for name, p in _vms(bed).items() if name.startswith(prefix)]
    assert len(matches) == 1, matches
    return matches[0]


def _docker_time(text: str) -> float:
    """An RFC 3339 time as Docker prints it (nanoseconds, ``Z``) as a Unix time."""
    seconds, _, fraction = text.rstrip("Z").partition(".")
    whole = datetime.datetime.fromisoformat(seconds).replace(tzinfo=datetime.UTC)
    return whole.timestamp() + float(f"0.{fraction or 0}")


def _echoed_both_ways(bed: ComposeProject, vm_ids: set[str], after: float = 0.0) -> bool:
    """Every VM in ``vm_ids`` has a checked echo each way (logged after ``after``, wall clock)."""
    results = [r for r in bed.results() if r.get("at", 0) >= after]
    out = ok_results(results, role="host", direction="host->vm")
    back = ok_results(results, role="vm", direction="vm->host")
    return vm_ids <= out.keys() and vm_ids <= back.keys()


def test_testbed_comes_up_and_echoes_on_both_data_paths(testbed: ComposeProject) -> None:
    wait_for("the host's health check", lambda: "(healthy)" in testbed.run("ps").stdout, 120)

    def both_attached() -> bool:
        names = [name for name, p in _vms(testbed).items() if p["attached"]]
        return all(any(n.startswith(prefix) for n in names) for prefix in ("vm-linux", "vm-win"))

    wait_for("vm-linux and vm-windows to attach", both_attached, 120)
    vm_linux = _vm_named(testbed, "vm-linux")
    vm_windows = _vm_named(testbed, "vm-windows")
    assert vm_linux["personality"] == "linux" and vm_windows["personality"] == "windows"
    ids = {vm_linux["vm_id"], vm_windows["vm_id"]}
    wait_for("the demo workload's echoes", lambda: _echoed_both_ways(testbed, ids), 180)

    results = testbed.results()
    out = ok_results(results, role="host", direction="host->vm")
    back = ok_results(results, role="vm", direction="vm->host")
    for vm_id in ids:
        # Every byte checked: the echo matched its SHA-256 and is whole.
        assert out[vm_id]["bytes"] == back[vm_id]["bytes"] == 8 * 2**20
    # vm-linux mounts the host's descriptor socket: shared memory; vm-windows does not: relay.
    assert out[vm_linux["vm_id"]]["data_path"] == back[vm_linux["vm_id"]]["data_path"] == "shm"
    assert (
        out[vm_windows["vm_id"]]["data_path"] == back[vm_windows["vm_id"]]["data_path"] == "relay"
    )

    # The host program's readable summary table names both VMs.
    def summary_with_both() -> bool:
        text = testbed.logs("hostprog")
        table = text[text.rfind("testbed summary") :]
        return "testbed summary" in text and all(
            vm["name"][:26] in table for vm in (vm_linux, vm_windows)
        )

    wait_for("the host program's summary table", summary_with_both, 60)

    # The metrics port is published (on a random loopback port here).
    port = testbed.run("port", "host", "9100").stdout.strip().rsplit(":", 1)[1]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        assert b"hvsock_partitions_attached" in page.read()


def test_unmodified_http_server_in_a_vm_through_two_bridges(testbed: ComposeProject) -> None:
    """vm-web: python -m http.server, published as hv service 80 by a bridge in the VM; the
    web-bridge container (host partition) reaches it by VM name; this machine fetches a file
    through the published port with an ordinary HTTP client."""
    want = testbed.exec("vm-web", "sha256sum", "/tmp/www/blob.bin").stdout.split()[0]
    port = testbed.run("port", "web-bridge", "8080").stdout.strip().rsplit(":", 1)[1]

    def fetch() -> bytes | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/blob.bin", timeout=30) as page:
                return bytes(page.read())
        except OSError:  # the VM or its bridges are not up yet
            return None

    body = wait_for("the VM's web server through the bridges", fetch, 120)
    assert len(body) == 4 * 2**20
    assert hashlib.sha256(body).hexdigest() == want


# Runs in the vm-web-vsock container: the hybrid vsock handshake, then an HTTP request to the
# VM's web server; prints the SHA-256 of the body.
_HYBRID_CLIENT = """
import hashlib, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect("/run/hvsock/vm-web.vsock")
s.sendall(b"CONNECT 80\\n")
answer = b""
while not answer.endswith(b"\\n"):
    chunk = s.recv(1)
    if not chunk:
        sys.exit("closed before OK")
    answer += chunk
assert answer == b"OK 80\\n", answer
s.sendall(b"GET /blob.bin HTTP/1.0\\r\\n\\r\\n")
reply = b"".join(iter(lambda: s.recv(65536), b""))
head, _, body = reply.partition(b"\\r\\n\\r\\n")
print(head.split(b"\\r\\n")[0].decode(), len(body), hashlib.sha256(body).hexdigest())
"""


def test_the_vm_through_a_hybrid_vsock_socket(testbed: ComposeProject) -> None:
    """vm-web-vsock serves the Firecracker/OpenVMM-style Unix socket for vm-web (found by name)."""
    want = testbed.exec("vm-web", "sha256sum", "/tmp/www/blob.bin").stdout.split()[0]

    def fetch() -> str | None:
        done = testbed.exec("vm-web-vsock", "python", "-c", _HYBRID_CLIENT, check=False)
        return done.stdout if done.returncode == 0 else None  # not listening yet: again

    status, length, digest = wait_for("the hybrid vsock socket", fetch, 120).rsplit(" ", 2)
    assert status == "HTTP/1.0 200 OK"
    assert int(length) == 4 * 2**20 and digest.strip() == want


def test_unmodified_socat_in_a_vm_through_hvsock_run(testbed: ComposeProject) -> None:
    """vm-vsock: Debian's socat listening on vsock port 5000 in a VM (hvsock run); the host
    partition dials the VM's CID with socat through hvsock run too, sends 4 MiB and reads
    back its SHA-256 (computed in the VM)."""

    def listening() -> dict[str, Any] | None:
        vm = _vms(testbed).get("vm-vsock")
        return vm if vm is not None and vm["attached"] and vm["listener_count"] else None

    vm = wait_for("vm-vsock's socat to listen", listening, 120)
    script = (
        "head -c 4194304 /dev/urandom > /tmp/blob && sha256sum < /tmp/blob && "
        f"hvsock run --host-partition -- socat -t 30 - VSOCK-CONNECT:{vm['cid']}:5000 < /tmp/blob"
    )
    sent, received = testbed.exec("host", "sh", "-c", script).stdout.split()[::2]
    assert sent == received


def test_a_vm_connecting_to_another_vm_is_refused(testbed: ComposeProject) -> None:
    other = _vm_named(testbed, "vm-windows")["vm_id"]
    done = testbed.exec(
        "vm-linux",
        "python",
        "-m",
        "hvsock_tools.testbed",
        "--bytes=1024",
        "echo",
        f"--to={other}",
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    (result,) = [
        json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT ")
    ]
    assert not result["connected"]
    assert result["errno"] in ("ECONNREFUSED", "ENETUNREACH", "EACCES"), result
    # The same program reaches the host from that VM container (as the same VM).
    done = testbed.exec(
        "vm-linux", "python", "-m", "hvsock_tools.testbed", "--bytes=1024", "echo", "--to=host"
    )
    assert "sha256 ok" in done.stdout


def test_vm_killed_mid_transfer(testbed: ComposeProject) -> None:
    vm = _vm_named(testbed, "vm-linux")
    stream = testbed.popen(
        "exec",
        "-T",
        "hostprog",
        "python",
        "-m",
        "hvsock_tools.testbed",
        "stream",
        f"--to={vm['vm_id']}",
        "--seconds=120",
    )
    assert stream.stdout is not None
    try:
        first = stream.stdout.readline()
        assert first.startswith("STREAMING"), first + stream.stdout.read()
        assert "shared memory" in first
        testbed.run("kill", "-s", "SIGKILL", "vm-linux")
        # When the VM's process died, by Docker's clock (not when the compose CLI started).
        (container,) = testbed.container_ids("vm-linux")
        finished = subprocess.run(
            ["docker", "inspect", "--format", "{{.State.FinishedAt}}", container],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        killed_at = _docker_time(finished)
        lines = stream.stdout.read().splitlines()
    finally:
        stream.kill()
        stream.wait()
        stream.stdout.close()
    (result,) = [json.loads(line[7:]) for line in lines if line.startswith("RESULT ")]
    assert result["error"], result
    assert result["bytes"] > 0
    assert result["failed_at"] - killed_at < 1.0, result

    def no_channels_left() -> bool:
        return not testbed.hvsock("channels", "--vm", vm["vm_id"])["channels"]

    wait_for("the killed VM's channels to go", no_channels_left, 10)
    # No channel is open anywhere now, so the host maps no ring segment, and none has a name.
    assert not testbed.hvsock("channels")["channels"]
    maps = testbed.exec("host", "cat", "/proc/1/maps").stdout
    assert "memfd:hvsock-channel" not in maps
    segments = testbed.exec("host", "ls", "-A", "/dev/shm").stdout.split()
    assert not [s for s in segments if s.startswith("hvsock-")], segments

    # Started again, the same container is the same VM (its identity file) and echoes again.
    since = time.time()
    testbed.run("start", "vm-linux")
    wait_for(
        "the restarted VM to echo", lambda: _echoed_back_since(testbed, vm["vm_id"], since), 120
    )


def _echoed_back_since(bed: ComposeProject, vm_id: str, since: float) -> bool:
    return any(
        r.get("vm_id") == vm_id and r.get("ok") and r.get("at", 0) >= since
        for r in bed.results("vm-linux", "vm-windows")
        if r.get("role") == "vm"
    )


def test_host_restart_vms_reattach_and_state_survives(testbed: ComposeProject) -> None:
    before = _echo_vms(testbed)
    service = "c0ffee00-0000-4000-8000-00000000e2e0"
    testbed.exec("host", "hvsock", "services", "register", service, "--name=e2e-registration")
    since = time.time()
    testbed.run("restart", "--timeout", "5", "host")
    ids = {p["vm_id"] for p in before.values()}

    wait_for("VMs to re-attach and echo again", lambda: _echoed_both_ways(testbed, ids, since), 180)
    after = _echo_vms(testbed)
    assert {p["vm_id"] for p in after.values()} == ids  # the same VMs, not new ones
    assert all(p["attached"] for p in after.values())
    services = testbed.hvsock("services", "list")["services"]
    assert any(s["service_id"] == service for s in services), services


def test_scale_to_eight_vms(testbed: ComposeProject) -> None:
    first = {p["vm_id"] for name, p in _vms(testbed).items() if name.startswith("vm-linux")}
    since = time.time()
    testbed.run("up", "--detach", "--no-recreate", "--scale", "vm-linux=8", timeout=300)

    def eight_linux_vms() -> set[str] | None:
        ids = {p["vm_id"] for name, p in _vms(testbed).items() if name.startswith("vm-linux")}
        return ids if len(ids) == 8 else None

    ids = wait_for("8 vm-linux VMs", eight_linux_vms, 180)
    # The seven new ones echo both ways; the first one already did.
    new = ids - first
    assert len(new) == 7
    wait_for("every new VM to echo both ways", lambda: _echoed_both_ways(testbed, new, since), 240)


def _stop_with_sigterm(container: str) -> tuple[float, int]:
    """(seconds from SIGTERM to exit, by Docker's clock for the exit, exit code)."""
    sent = time.time()
    subprocess.run(["docker", "kill", "--signal", "SIGTERM", container], check=True, timeout=30)

    def exited() -> list[str] | None:
        state = subprocess.run(
            [
                "docker",
                "inspect",
                "--format",
                "{{.State.Running}} {{.State.FinishedAt}} {{.State.ExitCode}}",
                container,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        return state if state[0] == "false" else None

    _, finished, code = wait_for(f"container {container} to stop", exited, 15, every=0.1)
    return _docker_time(finished) - sent, int(code)


# In the order `down` stops them: the programs before the host they are attached to.
STOPPED_IN_ORDER = (
    "web-bridge",
    "vm-web-vsock",
    "vm-web",
    "hostprog",
    "vm-windows",
    "vm-linux",
    "host",
)


def test_every_container_stops_cleanly_on_sigterm_and_down_is_quick(
    testbed: ComposeProject,
) -> None:
    """``docker stop`` sends SIGTERM and waits 10 s before SIGKILL; every program (PID 1 in
    its container, so with no default SIGTERM action) must stop by itself within 2 s with
    exit 0. Runs last: it takes the testbed down."""
    times: dict[str, list[float]] = {}
    for service in STOPPED_IN_ORDER:
        for container in testbed.container_ids(service):
            seconds, code = _stop_with_sigterm(container)
            assert code == 0, (service, code, testbed.logs(service)[-2000:])
            times.setdefault(service, []).append(round(seconds, 2))
    print("seconds from SIGTERM to exit:", times)
    slow = {s: t for s, t in times.items() if max(t) >= 2.0}
    assert not slow, times
    assert set(times) == set(STOPPED_IN_ORDER), times

    # The testbed as `up` makes it (one vm-linux: the scaling test left eight) running again,
    # the VMs attached and echoing, then `down` as a user runs it.
    since = time.time()
    testbed.run("up", "--detach", "--no-recreate", "--scale", "vm-linux=1", timeout=300)

    def attached_again() -> set[str] | None:
        # The host keeps every VM the scaling test made; only the running ones attach again.
        attached = {n: p for n, p in _echo_vms(testbed).items() if p["attached"]}
        if all(any(n.startswith(prefix) for n in attached) for prefix in ("vm-linux", "vm-win")):
            return {p["vm_id"] for p in attached.values()}
        return None

    ids = wait_for("vm-linux and vm-windows to attach again", attached_again, 120)
    wait_for("the VMs to echo again", lambda: _echoed_both_ways(testbed, ids, since), 240)
    start = time.monotonic()
    testbed.run("down", "--volumes", "--remove-orphans", timeout=60)
    took = time.monotonic() - start
    print(f"down -v: {took:.1f} s")
    assert took < 5.0, took


def test_the_same_file_deploys_to_swarm() -> None:
    """``docker stack deploy`` reads the file with its own (stricter) loader; check it loads
    and keeps every service, with the published ports Swarm needs."""
    if os.environ.get("HVSOCK_E2E") != "1":
        pytest.skip("container tests: set HVSOCK_E2E=1 (make e2e) to run them; they need Docker")
    env = {
        **os.environ,
        "HVSOCK_GRPC_PUBLISH": "50051",
        "HVSOCK_METRICS_PUBLISH": "9100",
        "HVSOCK_WEB_PUBLISH": "8080",
    }
    done = subprocess.run(
        ["docker", "stack", "config", "--compose-file", str(ROOT / "docker-compose.yml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    services = (
        "host",
        "hostprog",
        "vm-linux",
        "vm-windows",
        "vm-web",
        "web-bridge",
        "vm-web-vsock",
    )
    for service in (f"{name}:" for name in services):
        assert f"\n  {service}\n" in done.stdout, service
    assert "internal: true" in done.stdout
