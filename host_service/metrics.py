"""Prometheus metrics of the host service (served over HTTP when --metrics-port is given)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

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
RING_FULL_WAITS = Counter(
    "hvsock_ring_full_waits_total",
    "Times a relayed writer waited for ring space.",
    registry=REGISTRY,
)


def serve(address: str, port: int) -> int:
    """Start the /metrics HTTP endpoint in a daemon thread; returns the bound port."""
    server, _thread = start_http_server(port, addr=address, registry=REGISTRY)
    return int(server.server_port)
