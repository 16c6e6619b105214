"""The host as a service: lifecycle faults, timeouts, health, reflection, metrics, logs, state."""

from __future__ import annotations

import errno
import json
import pathlib
import re
import urllib.request
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from hvsock.v1 import hvsock_pb2

from .hostproc import run_host
from .test_host_api import PARENT, WILDCARD, attach_host, attach_vm, create_vm, open_pair
from .test_host_badinput import admin_call, assert_healthy, wait_for_no_channels

pytestmark = pytest.mark.integration

KIND = hvsock_pb2.ChannelNotice


def test_detach_rescinds_the_partitions_channels(tmp_path: pathlib.Path) -> None:
    with run_host(tmp_path) as host:
        vm = create_vm(host, "vm1")
        guest, root = attach_vm(host, vm), attach_host(host)
        g, _h = open_pair(guest, root)
        guest.close()  # the attach stream ends
        notice = root.event().notice
        assert (notice.channel_id, notice.kind) == (g.channel_id, KIND.KIND_RESCINDED)
        wait_for_no_channels(host)
        root.close()
        assert_healthy(host)


@pytest.mark.parametrize("method", ["StopPartition", "DeletePartition"])
def test_stop_and_delete_rescind_and_end_the_session(tmp_path: pathlib.Path, method: str) -> None:
    with run_host(tmp_path) as host:
        vm = create_vm(host, "vm1")
        guest, root = attach_vm(host, vm), attach_host(host)
        g, _h = open_pair(guest, root)
        request = getattr(hvsock_pb2, f"{method}Request")(vm_id=vm.partition.vm_id)
        admin_call(host, method, request)
        assert root.event().notice.kind == KIND.KIND_RESCINDED
        guest._reader.join(timeout=10)  # the VM's attach stream is ended by the host
        assert guest.ended is not None
        assert guest.ended.code() == grpc.StatusCode.UNAVAILABLE
        wait_for_no_channels(host)
        root.close()
        assert g.channel_id
        assert_healthy(host)


def test_close_timeout_rescinds_a_half_closed_channel(tmp_path: pathlib.Path) -> None:
    with run_host(tmp_path, "--close-timeout-ms", "200") as host:
        vm = create_vm(host, "vm1")
        guest, root = attach_vm(host, vm), attach_host(host)
        g, _h = open_pair(guest, root)
        assert guest.request(close=hvsock_pb2.Close(channel_id=g.channel_id)).HasField("ack")
        # The root never closes: after 200 ms the host rescinds.
        kinds = []
        while not kinds or kinds[-1] != KIND.KIND_RESCINDED:
            kinds.append(root.event().notice.kind)
        wait_for_no_channels(host)
        info = host_info(host)
        assert info.limits.close_timeout_ms == 200
        guest.close()
        root.close()


def host_info(host: object) -> hvsock_pb2.GetInfoResponse:
    from hvsock.v1 import hvsock_pb2_grpc

    with grpc.insecure_channel(host.target) as channel:  # type: ignore[attr-defined]
        stub = hvsock_pb2_grpc.HostServiceStub(channel)
        return stub.GetInfo(hvsock_pb2.GetInfoRequest(), timeout=10)


def test_linux_connect_to_missing_service_times_out(tmp_path: pathlib.Path) -> None:
    with run_host(tmp_path) as host:
        vm = create_vm(host, "linux")
        guest = attach_vm(host, vm)
        answer = guest.request(
            connect=hvsock_pb2.Connect(
                remote=hvsock_pb2.Address(vm_id=PARENT, service_id=str(uuid.uuid4())),
                connect_timeout_ms=150,
            )
        ).error
        assert answer.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        assert answer.errno.errno == errno.ETIMEDOUT
        guest.close()
        wait_for_no_channels(host)


def test_strict_registry(tmp_path: pathlib.Path) -> None:
    with run_host(tmp_path, "--strict-registry") as host:
        root = attach_host(host)
        service = str(uuid.uuid4())
        address = hvsock_pb2.Address(vm_id=WILDCARD, service_id=service)
        refused = root.request(listen=hvsock_pb2.Listen(address=address)).error
        assert refused.code == grpc.StatusCode.PERMISSION_DENIED.value[0], refused
        admin_call(
            host,
            "RegisterService",
            hvsock_pb2.RegisterServiceRequest(service_id=service, element_name="svc"),
        )
        assert root.request(listen=hvsock_pb2.Listen(address=address)).HasField("listening")
        root.close()


def test_health_reflection_metrics_json_logs_and_graceful_shutdown(
    tmp_path: pathlib.Path,
) -> None:
    with run_host(
        tmp_path,
        "--metrics-port",
        "0",
        "--log-format",
        "json",
        env={"HVSOCK_MAX_SOCKET_NUMBER": "77"},
    ) as host:
        assert host_info(host).limits.max_socket_number == 77  # read from the environment
        with grpc.insecure_channel(host.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", "hvsock.v1.HostService", "hvsock.v1.AdminService"):
                status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
                assert status.status == health_pb2.HealthCheckResponse.SERVING
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            answers = reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
            names = {s.name for a in answers for s in a.list_services_response.service}
            assert {
                "hvsock.v1.HostService",
                "hvsock.v1.AdminService",
                "grpc.health.v1.Health",
            } <= names
        vm = create_vm(host, "vm1")
        guest, root = attach_vm(host, vm), attach_host(host)
        open_pair(guest, root)
        records = [json.loads(line) for line in host.log if line.startswith("{")]
        serving = next(r for r in records if r["message"].startswith("serving on"))
        port = int(re.search(r"metrics on [^:]+:(\d+)", serving["message"]).group(1))  # type: ignore[union-attr]
        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        )
        assert 'hvsock_channels{state="open"} 1.0' in text
        assert 'hvsock_connects_total{outcome="opened"} 1.0' in text
        assert "hvsock_partitions_attached 2.0" in text
        # SIGTERM: both attach streams end first, saying why (so programs reset their
        # sockets, as when a host dies), then every channel is rescinded; no segment left.
        assert host.stop() == 0
        for session in (root, guest):
            session._reader.join(10)
            assert session.ended is not None
            assert session.ended.code() == grpc.StatusCode.UNAVAILABLE
            assert "host shutting down" in (session.ended.details() or "")
            assert session.events.empty()  # no rescind notice ahead of the end
        assert host.no_segments_within() == []
        records = [json.loads(line) for line in host.log if line.startswith("{")]
        assert any(r["message"] == "draining" for r in records)
        assert any(r["message"] == "stopped" for r in records)


def test_state_survives_a_restart(tmp_path: pathlib.Path) -> None:
    state = tmp_path / "host.sqlite"
    service = str(uuid.uuid4())
    with run_host(tmp_path, "--state", str(state)) as host:
        vm = create_vm(host, "kept")
        admin_call(
            host,
            "RegisterService",
            hvsock_pb2.RegisterServiceRequest(service_id=service, element_name="kept-svc"),
        )
        token = host.token
    assert state.stat().st_mode & 0o077 == 0
    with run_host(tmp_path, "--state", str(state)) as host:
        assert host.token != token  # a new host token; the VM's token is what must survive
        guest = attach_vm(host, vm)  # the old VM token still works
        assert guest.welcome.vm_id == vm.partition.vm_id and guest.welcome.name == "kept"
        services = admin_call(host, "ListServices", hvsock_pb2.ListServicesRequest()).services
        assert [(s.service_id, s.element_name) for s in services] == [(service, "kept-svc")]
        guest.close()
