"""Early frames against a live host, through guest_client: a relayed end the host credited as it
opened may have data and FIN on the SessionData stream before its ``opened`` is routed on the
attach stream. The link holds them for the end, whatever becomes of it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pytest

import guest_client as hv
from hvsock.v1 import hvsock_pb2
from hvsock_tools.demo import local_host

pytestmark = pytest.mark.integration

TIMEOUT = 30.0


def _wait_for(condition: Callable[[], object], what: str) -> None:
    # Polling, bounded: these states change on the library's stream threads, which signal
    # nothing a test could wait on.
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


class _Relayed(NamedTuple):
    server: Any  # the host partition, relayed, listening on ``service``
    client: Any  # a VM, relayed
    listener: Any
    service: str


@pytest.fixture
def relayed() -> Iterator[_Relayed]:
    with local_host(prefix="hvsock-early", log_level="WARNING") as host:
        server = host.partition(data_path="relay")
        client = host.partition(vm=host.create_vm("early"), data_path="relay")
        try:
            service = hv.service_id_for_port(5300)
            listener = server.socket()
            listener.bind((hv.HV_GUID_WILDCARD, service))
            listener.listen(4)
            yield _Relayed(server, client, listener, service)
        finally:
            client.close()
            server.close()


def _connect_accept_close_at_once(r: _Relayed) -> None:
    connected = r.client.socket()
    connected.connect((hv.HV_GUID_PARENT, r.service))
    accepted, _ = r.listener.accept()
    accepted.close()
    connected.close()


def _until_the_servers_stream_is_open(r: _Relayed) -> None:
    """Connect cycles until the server's end of one opens credited: the host has then read the
    first request of the server's SessionData stream, so ends opening from now on are credited
    at once. (The library opens that stream on a worker as its first relayed end opens, so a
    connect right after the first cycle may still find it not open at the host.)"""
    deadline = time.monotonic() + TIMEOUT
    while True:
        connected = r.client.socket()
        connected.connect((hv.HV_GUID_PARENT, r.service))
        accepted, _ = r.listener.accept()
        credited = accepted._end.channel.relay_receive_credited
        accepted.close()
        connected.close()
        if credited:
            return
        assert time.monotonic() < deadline, "the server's stream never opened at the host"


def test_ends_closed_before_granting_anything_still_close(relayed: _Relayed) -> None:
    """The first channel of two sessions opens before either's SessionData stream, so neither
    end is credited as it opens; both close at once, before their first credit went out. The
    host forwards no FIN or close toward an end that never granted, so each close would wait
    for the other's credit for as long as the sessions live, did the host not count a closed
    end as gone for its peer's bytes."""
    _connect_accept_close_at_once(relayed)
    for partition in (relayed.server, relayed.client):
        link = partition._link
        assert link is not None
        _wait_for(lambda link=link: not link._pipes, "an end was never closed")


def test_an_opening_for_a_closed_listener_takes_its_early_frames(relayed: _Relayed) -> None:
    """The host accepts a connect on a listener's behalf and sends the connector's data and FIN
    to the listener's end before its partition routes the ``opened``; by then the listener is
    closed. The end is still built and closed on its stream, so the frames are taken (and the
    close answered) rather than held for an end that never comes."""
    server, client, listener, service = relayed
    _until_the_servers_stream_is_open(relayed)
    # Hold the server's attach reader in an answer's callback, so the next opening
    # waits behind it while its frames arrive on the other stream.
    holding, release = threading.Event(), threading.Event()

    def hold(_answer: hvsock_pb2.AttachResponse) -> None:
        holding.set()
        release.wait(TIMEOUT)

    server.send_request(
        on_answer=hold,
        listen=hvsock_pb2.Listen(
            address=hvsock_pb2.Address(
                vm_id=hv.HV_GUID_WILDCARD, service_id=hv.service_id_for_port(5301)
            )
        ),
    )
    try:
        assert holding.wait(TIMEOUT)
        second = client.socket()
        second.connect((hv.HV_GUID_PARENT, service))  # returns once the host accepted
        second.sendall(b"early")
        second.close()
        link = server._link
        assert link is not None
        _wait_for(lambda: link._early, "the second end's frames did not arrive early")
        listener.close()
    finally:
        release.set()
    # The reader routes the opening: the end is built, takes its frames and closes; the
    # host's close_done ends it, and the link holds nothing for it.
    _wait_for(lambda: not link._early and not link._pipes, "the link still holds it")
