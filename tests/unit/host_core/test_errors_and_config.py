from __future__ import annotations

import errno
import inspect

import pytest

import host_service.core as core_pkg
from host_service.core import (
    HVSOCKET_CONNECT_TIMEOUT_MAX_MS,
    STATUS_NAMES,
    HostConfig,
    HvError,
    InvalidArgument,
)

pytestmark = pytest.mark.unit

# The documented errno/status of every error class: the adapter and clients rely on these.
EXPECTED = {
    "HvError": (errno.EIO, "INTERNAL"),
    "InvalidArgument": (errno.EINVAL, "INVALID_ARGUMENT"),
    "BadAddress": (errno.EINVAL, "INVALID_ARGUMENT"),
    "NetworkUnreachable": (errno.ENETUNREACH, "INVALID_ARGUMENT"),
    "GuestToGuestRefused": (errno.ENETUNREACH, "PERMISSION_DENIED"),
    "HostUnreachable": (errno.EHOSTUNREACH, "NOT_FOUND"),
    "NotFound": (errno.ENOENT, "NOT_FOUND"),
    "AlreadyExists": (errno.EEXIST, "ALREADY_EXISTS"),
    "AddressInUse": (errno.EADDRINUSE, "ALREADY_EXISTS"),
    "AddressNotAvailable": (errno.EADDRNOTAVAIL, "RESOURCE_EXHAUSTED"),
    "NoBuffers": (errno.ENOBUFS, "RESOURCE_EXHAUSTED"),
    "TooManySessions": (errno.ENOBUFS, "RESOURCE_EXHAUSTED"),
    "TooManyPartitions": (errno.ENOBUFS, "RESOURCE_EXHAUSTED"),
    "Unauthenticated": (errno.EACCES, "UNAUTHENTICATED"),
    "PermissionDenied": (errno.EACCES, "PERMISSION_DENIED"),
    "ServiceNotRegistered": (errno.EACCES, "PERMISSION_DENIED"),
    "InvalidState": (errno.EINVAL, "FAILED_PRECONDITION"),
    "PartitionNotRunning": (errno.ENETDOWN, "FAILED_PRECONDITION"),
    "ProtocolError": (errno.EPROTO, "FAILED_PRECONDITION"),
    "NotConnected": (errno.ENOTCONN, "FAILED_PRECONDITION"),
    "ConnectionRefused": (errno.ECONNREFUSED, "UNAVAILABLE"),
    "ConnectTimedOut": (errno.ETIMEDOUT, "DEADLINE_EXCEEDED"),
    "ConnectionReset": (errno.ECONNRESET, "UNAVAILABLE"),
}


def error_classes() -> dict[str, type[HvError]]:
    return {
        name: obj
        for name, obj in vars(core_pkg).items()
        if inspect.isclass(obj) and issubclass(obj, HvError)
    }


def test_every_error_class_is_exported_and_documented() -> None:
    assert set(error_classes()) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_errno_and_status(name: str) -> None:
    cls = error_classes()[name]
    assert (cls.errno, cls.status) == EXPECTED[name]
    assert cls.status in STATUS_NAMES
    error = cls("boom")
    assert str(error) == "boom" and error.message == "boom" and error.events == ()


def test_invalid_argument_is_also_a_value_error() -> None:
    assert issubclass(InvalidArgument, ValueError)


def test_config_defaults_are_the_seed_values() -> None:
    config = HostConfig()
    assert config.max_socket_number == 1024
    assert config.send_ring_page == 2
    assert config.recv_ring_page == 3
    assert config.max_ring_pages == 64
    assert config.connect_timeout == 2.0
    assert config.close_timeout == 8.0
    assert config.max_connect_timeout_ms == HVSOCKET_CONNECT_TIMEOUT_MAX_MS == 300_000
    assert config.strict_registry is False
    assert config.allow_guest_to_guest is False
    assert config.default_backlog == 128
    assert config.max_sessions_per_partition == 64
    assert config.max_partitions == 1024


def test_config_is_frozen() -> None:
    config = HostConfig()
    with pytest.raises(AttributeError):
        config.max_socket_number = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_socket_number", 0, "positive integer"),
        ("max_socket_number", True, "positive integer"),
        ("send_ring_page", 1, "between 2 and max_ring_pages"),
        ("recv_ring_page", 65, "between 2 and max_ring_pages"),
        ("max_ring_pages", -1, "positive integer"),
        ("connect_timeout", 0.0, "connect_timeout"),
        ("connect_timeout", 301.0, "connect_timeout"),
        ("close_timeout", 0.0, "close_timeout"),
        ("default_backlog", -1, "default_backlog"),
        ("default_backlog", 70_000, "default_backlog"),
        ("event_log_size", 0, "positive integer"),
        ("max_sessions_per_partition", 0, "positive integer"),
        ("max_sessions_per_partition", 2.5, "positive integer"),
        ("max_partitions", 0, "positive integer"),
    ],
)
def test_config_validation(field: str, value: object, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        HostConfig(**{field: value})  # type: ignore[arg-type]
