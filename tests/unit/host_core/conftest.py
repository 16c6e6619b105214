"""Fixtures for the pure host core: a deterministic HostCore and a small driver around it."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest

from host_service.core import (
    HOST_VM_ID,
    Event,
    HostConfig,
    HostCore,
    PartitionEvent,
    Session,
)

HOST_TOKEN = "host-secret"
E = TypeVar("E", bound=Event)


def guid_counter(prefix: str = "") -> Callable[[], str]:
    """Deterministic fresh GUIDs: 10000001-0000-4000-8000-000000000000, ..."""
    counter = itertools.count(0x10000001)
    return lambda: f"{next(counter):08x}-0000-4000-8000-000000000000"


@dataclass
class World:
    """A HostCore with the host attached and helpers to make VMs and read events."""

    core: HostCore
    host: Session
    tokens: dict[str, str] = field(default_factory=dict)
    now: float = 0.0

    def vm(
        self, name: str = "vm", *, personality: str = "linux", attach: bool = True, **kw: Any
    ) -> tuple[str, Session | None]:
        info, token, _ = self.core.create_partition(name, self.now, personality=personality, **kw)
        self.tokens[info.vm_id] = token
        if not attach:
            return info.vm_id, None
        session, _ = self.core.attach(info.vm_id, token, self.now)
        return info.vm_id, session

    def guest(self, name: str = "vm", personality: str = "linux", **kw: Any) -> Session:
        _, session = self.vm(name, personality=personality, **kw)
        assert session is not None
        return session

    def session(self, vm_id: str) -> Session:
        """Another session (another process) of an existing partition."""
        token = HOST_TOKEN if vm_id == HOST_VM_ID else self.tokens[vm_id]
        session, _ = self.core.attach(vm_id, token, self.now)
        return session

    @staticmethod
    def to_session(events: Iterable[Event], session: Session) -> list[PartitionEvent]:
        """The events addressed to ``session`` (its partition and its session id)."""
        return [
            e
            for e in events
            if isinstance(e, PartitionEvent)
            and e.partition == session.vm_id
            and e.session_id == session.session_id
        ]

    # Event helpers live here because --import-mode=importlib cannot import conftest.
    @staticmethod
    def of_type(events: Iterable[Event], kind: type[E]) -> list[E]:
        return [e for e in events if isinstance(e, kind)]

    @staticmethod
    def one(events: Iterable[Event], kind: type[E], **match: Any) -> E:
        found = [
            e
            for e in events
            if isinstance(e, kind) and all(getattr(e, k) == v for k, v in match.items())
        ]
        assert len(found) == 1, f"expected one {kind.__name__} {match}, got {found}"
        return found[0]

    @staticmethod
    def addressed(events: Iterable[Event], vm_id: str) -> list[PartitionEvent]:
        return [e for e in events if isinstance(e, PartitionEvent) and e.partition == vm_id]

    @staticmethod
    def kinds(events: Iterable[Event]) -> list[str]:
        return [type(e).__name__ for e in events]


def make_world(**config: Any) -> World:
    tokens = itertools.count(1)
    core = HostCore(
        config=HostConfig(**config),
        host_token=HOST_TOKEN,
        token_factory=lambda: f"token-{next(tokens)}",
        guid_factory=guid_counter(),
    )
    host, _ = core.attach(HOST_VM_ID, HOST_TOKEN, 0.0)
    return World(core=core, host=host)


@pytest.fixture
def world() -> World:
    return make_world()


@pytest.fixture
def make() -> Callable[..., World]:
    """Build a World with config overrides: ``make(strict_registry=True)``."""
    return make_world
