"""Prometheus metrics of the host service (served over HTTP when --metrics-port is given)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry()

PARTITIONS_ATTACHED = Gauge(
    "hvsock_partitions_attached", "Partitions with an open attach stream.", registry=REGISTRY
)
CHANNELS = Gauge("hvsock_channels", "Channels by state.", ["state"], registry=REGISTRY)
CONNECTS = Counter(
    "hvsock_connects_total", "Connect requests by outcome.", ["outcome"], registry=REGISTRY
)
RESCINDS = Counter(
    "hvsock_rescinds_total",
    "Channels rescinded by the host, by reason.",
    ["reason"],
    registry=REGISTRY,
)
BYTES = Counter(
    "hvsock_relay_bytes_total",
    "Bytes moved by the gRPC relay, by direction.",
    ["direction"],
    registry=REGISTRY,
)
RELAY_PROMISED = Gauge(
    "hvsock_relay_window_promised_bytes",
    "Relay window bytes promised to clients beyond their peer rings' room (the budget used).",
    registry=REGISTRY,
)
RING_FULL_WAITS = Counter(
    "hvsock_ring_full_waits_total",
    "Times a relayed writer waited for ring space.",
    registry=REGISTRY,
)


_M = TypeVar("_M", Counter, Gauge)
_children: dict[tuple[int, str], Any] = {}


def child(metric: _M, value: str) -> _M:
    """``metric.labels(value)``, looked up once per value: ``labels()`` checks and locks on
    every call, which a connect paid a dozen times over. As many entries as the metric has
    children (a race only looks one up twice: the metric returns the same child)."""
    key = (id(metric), value)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(value)
    return found


#: Data paths of ring writers, as the metrics label them (EndPath values).
PATHS = ("shm", "relay")


@dataclasses.dataclass(frozen=True)
class RingSnapshot:
    """The rings of the open channels at one moment, for :class:`RingCollector`."""

    #: Bytes the ends on shared memory have written into their send rings, channels gone
    #: included (their last count).
    shm_bytes: int = 0
    #: Bytes waiting in rings, and ring data areas, by the data path of the ring's writer.
    used: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(PATHS, 0))
    size: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(PATHS, 0))


class RingCollector(Collector):
    """Bytes on shared memory and ring fill, read from the rings when Prometheus scrapes.

    An end on shared memory moves its bytes itself: the host sees none of them go by, so it
    reports the ring's own bytes_written counter. That counter lives in memory the end writes:
    it is reported (clamped, never backwards), and nothing the host decides depends on it.
    Ring fill is reported for every ring, whichever path its writer uses.

    The rings are mapped and unmapped on the host's event loop, so they are read there too:
    a scrape (a thread of the HTTP server) asks the loop for a snapshot and waits at most
    ``timeout`` seconds; a loop too busy to answer gets the last snapshot reported again.
    """

    def __init__(self, timeout: float = 2.0) -> None:
        self.timeout = timeout
        self._lock = threading.Lock()
        self._source: tuple[asyncio.AbstractEventLoop, Callable[[], RingSnapshot]] | None = None
        self._last = RingSnapshot()

    def watch(self, loop: asyncio.AbstractEventLoop, snapshot: Callable[[], RingSnapshot]) -> None:
        """Report the rings ``snapshot()`` (called on ``loop``) describes."""
        with self._lock:
            self._source = (loop, snapshot)
            self._last = RingSnapshot()

    def unwatch(self, snapshot: Callable[[], RingSnapshot]) -> None:
        with self._lock:
            if self._source is not None and self._source[1] == snapshot:
                self._source = None

    def snapshot(self) -> RingSnapshot:
        with self._lock:
            source, last = self._source, self._last
        if source is None:
            return last
        loop, take = source
        future: concurrent.futures.Future[RingSnapshot] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(take())
            except BaseException as exc:  # reported to the scrape below, not to the loop
                future.set_exception(exc)

        try:
            loop.call_soon_threadsafe(run)
            taken = future.result(self.timeout)
        except (RuntimeError, concurrent.futures.TimeoutError):  # loop closed, or busy
            return last
        with self._lock:
            self._last = taken
        return taken

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        taken = self.snapshot()
        yield CounterMetricFamily(
            "hvsock_shm_bytes",
            "Bytes written into rings by ends on the shared-memory path (the rings' own "
            "counters: reported, never used for decisions).",
            value=taken.shm_bytes,
        )
        used = GaugeMetricFamily(
            "hvsock_ring_used_bytes",
            "Bytes waiting in the rings of open channels, by the data path of each ring's writer.",
            labels=["path"],
        )
        size = GaugeMetricFamily(
            "hvsock_ring_size_bytes",
            "Data-area bytes of the rings of open channels, by the data path of each ring's "
            "writer (fill: used / size).",
            labels=["path"],
        )
        for path in PATHS:
            used.add_metric([path], taken.used.get(path, 0))
            size.add_metric([path], taken.size.get(path, 0))
        yield used
        yield size

    def describe(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        return iter(())  # no scrape at registration (there may be no host yet)


RINGS = RingCollector()
REGISTRY.register(RINGS)


def serve(address: str, port: int) -> int:
    """Start the /metrics HTTP endpoint in a daemon thread; returns the bound port."""
    server, _thread = start_http_server(port, addr=address, registry=REGISTRY)
    return int(server.server_port)
