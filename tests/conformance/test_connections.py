"""Connection set-up, routing, personalities and teardown through a real host service."""

from __future__ import annotations

import errno
import threading
import time

import pytest

import guest_client as hv
from hvsock.v1 import hvsock_pb2

from .conftest import Env

pytestmark = pytest.mark.integration


def listen(partition: hv.Partition, vm_id: str, service: str, backlog: int = 16) -> hv.HvSocket:
    sock = partition.socket()
    sock.bind((vm_id, service))
    sock.listen(backlog)
    return sock


def test_guest_to_host_addresses(host_env: Env) -> None:
    root, vm = host_env.root(), host_env.vm()
    service = host_env.service()
    listener = host_env.track(listen(root, hv.HV_GUID_WILDCARD, service))
    client = host_env.track(vm.socket())
    client.connect((hv.HV_GUID_PARENT.lower(), service.upper()))  # any case is accepted
    server, peer = listener.accept()
    host_env.track(server)
    assert peer == client.getsockname() and peer[0] == vm.vm_id
    assert client.getpeername() == (hv.HV_GUID_PARENT.lower(), service)
    assert server.getpeername() == peer


def test_host_to_guest(host_env: Env) -> None:
    root, vm = host_env.root(), host_env.vm()
    service = host_env.service()
    listener = host_env.track(listen(vm, hv.HV_GUID_WILDCARD, service))
    client = host_env.track(root.socket())
    client.connect((vm.vm_id, service))
    server, _ = listener.accept()
    host_env.track(server)
    client.sendall(b"from the host")
    assert server.recv(100) == b"from the host"


def test_loopback_inside_one_vm(host_env: Env) -> None:
    vm = host_env.vm()
    service = host_env.service()
    listener = host_env.track(listen(vm, hv.HV_GUID_WILDCARD, service))
    client = host_env.track(vm.socket())
    client.connect((hv.HV_GUID_LOOPBACK, service))
    server, _ = listener.accept()
    host_env.track(server)
    server.sendall(b"echo")
    assert client.recv(10) == b"echo"


def test_a_hundred_concurrent_connections(host_env: Env) -> None:
    root, vm = host_env.root(), host_env.vm()
    service = host_env.service()
    listener = host_env.track(listen(root, hv.HV_GUID_WILDCARD, service, backlog=128))
    clients = []
    for i in range(100):
        client = host_env.track(vm.socket())
        client.connect((hv.HV_GUID_PARENT, service))
        client.sendall(i.to_bytes(2, "big"))
        clients.append(client)
    seen = set()
    for _ in range(100):
        server, _ = listener.accept()
        host_env.track(server)
        seen.add(int.from_bytes(server.recv(2), "big"))
        server.sendall(b"ok")
    assert seen == set(range(100))
    assert all(c.recv(2) == b"ok" for c in clients)


def test_windows_guest_is_refused_at_once(host_env: Env) -> None:
    vm = host_env.vm("windows")
    client = host_env.track(vm.socket())
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        client.connect((hv.HV_GUID_PARENT, host_env.service()))
    assert time.monotonic() - started < 1.0


def test_linux_guest_times_out_after_the_connect_timeout(host_env: Env) -> None:
    vm = host_env.vm("linux")
    client = host_env.track(vm.socket())
    client.setsockopt(hv.HV_PROTOCOL_RAW, hv.HVSOCKET_CONNECT_TIMEOUT, 300)
    assert client.getsockopt(hv.HV_PROTOCOL_RAW, hv.HVSOCKET_CONNECT_TIMEOUT) == 300
    started = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        client.connect((hv.HV_GUID_PARENT, host_env.service()))
    assert info.value.errno == errno.ETIMEDOUT
    assert 0.29 <= time.monotonic() - started < 5


def test_linux_default_connect_timeout_is_two_seconds(host_env: Env) -> None:
    vm = host_env.vm("linux")
    client = host_env.track(vm.socket())
    started = time.monotonic()
    assert client.connect_ex((hv.HV_GUID_PARENT, host_env.service())) == errno.ETIMEDOUT
    assert 1.9 <= time.monotonic() - started < 6


def test_connect_timeout_option_is_bounded(host_env: Env) -> None:
    client = host_env.track(host_env.vm().socket())
    with pytest.raises(OSError) as info:
        client.setsockopt(hv.HV_PROTOCOL_RAW, hv.HVSOCKET_CONNECT_TIMEOUT, 300001)
    assert info.value.errno == errno.EINVAL


def test_retry_a_failed_connect_on_the_same_socket(host_env: Env) -> None:
    root, vm = host_env.root(), host_env.vm("windows")
    service = host_env.service()
    client = host_env.track(vm.socket())
    with pytest.raises(ConnectionRefusedError):
        client.connect((hv.HV_GUID_PARENT, service))
    listener = host_env.track(listen(root, hv.HV_GUID_WILDCARD, service))
    client.connect((hv.HV_GUID_PARENT, service))
    server, _ = listener.accept()
    host_env.track(server)


def test_double_bind_is_address_in_use(host_env: Env) -> None:
    root = host_env.root()
    service = host_env.service()
    host_env.track(listen(root, hv.HV_GUID_WILDCARD, service))
    second = host_env.track(root.socket())
    second.bind((hv.HV_GUID_WILDCARD, service))
    with pytest.raises(OSError) as info:
        second.listen()
    assert info.value.errno == errno.EADDRINUSE


def test_connect_racing_the_listener_close_never_hangs(host_env: Env) -> None:
    root, vm = host_env.root(), host_env.vm("windows")
    for _ in range(10):
        service = host_env.service()
        listener = listen(root, hv.HV_GUID_WILDCARD, service)
        client = host_env.track(vm.socket())
        client.settimeout(10)
        closer = threading.Thread(target=listener.close)
        closer.start()
        result = client.connect_ex((hv.HV_GUID_PARENT, service))
        closer.join()
        assert result in (0, errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT)


def test_host_listener_scopes_route_as_hyper_v_does(host_env: Env) -> None:
    root, vm_a, vm_b = host_env.root(), host_env.vm(name="a"), host_env.vm("windows", name="b")
    service = host_env.service()
    only_a = host_env.track(listen(root, vm_a.vm_id, service))
    client_a = host_env.track(vm_a.socket())
    client_a.connect((hv.HV_GUID_PARENT, service))
    host_env.track(only_a.accept()[0])
    client_b = host_env.track(vm_b.socket())
    with pytest.raises(ConnectionRefusedError):
        client_b.connect((hv.HV_GUID_PARENT, service))
    children_service = host_env.service()
    children = host_env.track(listen(root, hv.HV_GUID_CHILDREN, children_service))
    for vm in (vm_a, vm_b):
        client = host_env.track(vm.socket())
        client.connect((hv.HV_GUID_PARENT, children_service))
        host_env.track(children.accept()[0])


def test_guest_to_guest_is_refused(host_env: Env) -> None:
    vm_a, vm_b = host_env.vm(name="a"), host_env.vm(name="b")
    service = host_env.service()
    host_env.track(listen(vm_b, hv.HV_GUID_WILDCARD, service))
    client = host_env.track(vm_a.socket())
    with pytest.raises(OSError) as info:
        client.connect((vm_b.vm_id, service))
    assert info.value.errno in (errno.ENETUNREACH, errno.EACCES)


def test_rescind_drains_then_eof_then_epipe(host_env: Env) -> None:
    client, server = host_env.pair()
    server.sendall(b"before the rescind")
    # The data must be in the guest's ring before the host tears the channel down.
    assert client._end is not None and client._end.pipe.rx.wait_readable(10)
    assert host_env.host is not None
    channel, admin = host_env.host.admin()
    with channel:
        channels = admin.ListChannels(
            hvsock_pb2.ListChannelsRequest(), metadata=host_env.host.metadata, timeout=10
        ).channels
        ours = [c for c in channels if c.connector.vm_id == client.getsockname()[0]]
        admin.RescindChannel(
            hvsock_pb2.RescindChannelRequest(channel_id=ours[0].channel_id),
            metadata=host_env.host.metadata,
            timeout=10,
        )
    assert client.recv(100) == b"before the rescind"
    assert client.recv(100) == b""
    with pytest.raises(BrokenPipeError):
        client.sendall(b"x" * 100000)


def test_backlog_full_means_the_connect_times_out(host_env: Env) -> None:
    root, vm = host_env.root(), host_env.vm()
    service = host_env.service()
    host_env.track(listen(vm, hv.HV_GUID_WILDCARD, service, backlog=1))
    first = host_env.track(root.socket())
    first.connect((vm.vm_id, service))  # takes the one backlog slot (never accepted)
    second = host_env.track(root.socket())
    second.setsockopt(hv.HV_PROTOCOL_RAW, hv.HVSOCKET_CONNECT_TIMEOUT, 300)
    with pytest.raises(TimeoutError):
        second.connect((vm.vm_id, service))


def test_accept_gives_auto_accept_credit_back_in_steps(
    host_env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host accepts on a listener's behalf while it holds credit (no offer round trip);
    accept() gives credit back a quarter of the backlog at a time, not one message each, and
    a serial load never runs the host out of it."""
    root, vm = host_env.root(), host_env.vm()
    service = host_env.service()
    returned: list[int] = []
    offered: list[hvsock_pb2.Offer] = []
    notify, on_offer = root.notify, root._offered

    def notify_spy(**kind: object) -> None:
        if "accept_credit" in kind:
            assert isinstance(kind["accept_credit"], hvsock_pb2.AcceptCredit)
            returned.append(kind["accept_credit"].count)
        notify(**kind)

    def offer_spy(offer: hvsock_pb2.Offer) -> None:
        offered.append(offer)
        on_offer(offer)

    monkeypatch.setattr(root, "notify", notify_spy)
    monkeypatch.setattr(root, "_offered", offer_spy)
    listener = host_env.track(listen(root, hv.HV_GUID_WILDCARD, service, backlog=8))
    for _ in range(24):
        with vm.socket() as client:
            client.connect((hv.HV_GUID_PARENT, service))
            server, _ = listener.accept()
            server.close()
    assert returned == [2] * 12
    assert offered == []
