"""Many connects in flight at once through guest_client, on the relay: the library sends the
requests that queue up while its attach stream is busy in batches (AttachRequest.batch) and
takes the host's answers in batches (AttachResponse.batch); every connect must still get its own
channel, and every channel its own bytes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import guest_client as hv
from hvsock_tools.demo import local_host

pytestmark = pytest.mark.integration

CONNECTS = 64
TIMEOUT = 30.0


@pytest.fixture
def relayed() -> Iterator[tuple[Any, Any]]:
    """(host partition, VM), both on the relay."""
    with local_host(prefix="hvsock-batches", log_level="WARNING") as host:
        server = host.partition(data_path="relay")
        client = host.partition(vm=host.create_vm("batches"), data_path="relay")
        try:
            yield server, client
        finally:
            client.close()
            server.close()


def _echo(listener: Any, count: int) -> None:
    for _ in range(count):
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(TIMEOUT)
            conn.sendall(conn.recv(64))


def test_many_connects_in_flight_each_get_their_own_channel(relayed: tuple[Any, Any]) -> None:
    server, client = relayed
    service = hv.service_id_for_port(5400)
    listener = server.socket()
    listener.bind((hv.HV_GUID_WILDCARD, service))
    listener.listen(CONNECTS)
    echo = threading.Thread(target=_echo, args=(listener, CONNECTS), daemon=True)
    echo.start()
    start = threading.Barrier(CONNECTS)

    def one(index: int) -> bytes:
        sock = client.socket()
        with sock:
            sock.settimeout(TIMEOUT)
            start.wait(TIMEOUT)  # every connect leaves at once: they queue behind each other
            sock.connect((hv.HV_GUID_PARENT, service))
            sock.sendall(b"%08d" % index)
            return sock.recv(64)

    with ThreadPoolExecutor(CONNECTS) as pool:
        answers = list(pool.map(one, range(CONNECTS), timeout=TIMEOUT * 2))
    assert answers == [b"%08d" % index for index in range(CONNECTS)]
    echo.join(TIMEOUT)
    assert not echo.is_alive()
    listener.close()
