"""Listeners and their backlogs: who listens where, and which listener takes a connect now.

A listener is bound to ``(scope, service id)`` in one partition and belongs to the session that
made it (offers go to that session; the listener ends with it).  Its ``backlog`` bounds the
channels offered through it but not yet accepted (``pending``): a full backlog makes a connect
behave as if nobody listened.  The scope rules (who may bind what, who hears whom, which
listener wins) are :mod:`~host_service.core.router`'s; this module applies them to the live
listeners.

Sockets and ``max_socket_number``.  A partition's socket count is its listeners plus its
channel ends (see :mod:`~host_service.core.records`).  Going over the limit raises
:class:`~host_service.core.errors.NoBuffers` for the caller; an acceptor at its limit makes an
incoming connect behave like a full backlog.

Owns: the listener table and ids, every partition's ``listeners`` / ``by_service``, each
listener's backlog bookkeeping (``pending``, changed through :meth:`Listeners.offered` and
:meth:`Listeners.settled` as offers are made and end).  May read, but not change: channels -- a
listener with offers pending is closed only after the caller has refused them
(:meth:`~host_service.core.connects.ConnectRouter.refuse_pending`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from host_service.core.config import HostConfig
from host_service.core.errors import AddressInUse, InvalidArgument, NotFound, ServiceNotRegistered
from host_service.core.eventlog import EventLog
from host_service.core.events import Event, ListenerChanged
from host_service.core.records import _Listener, _Partition
from host_service.core.registry import ServiceRegistry
from host_service.core.rings import ring_request
from host_service.core.router import scope_hears, scope_rank, scopes_overlap, validate_listen_scope
from host_service.core.types import ListenerInfo, PartitionState, Session
from hvsock_common.addresses import parse_guid

__all__ = ["Listeners"]


class Listeners:
    """Every live listener, by id and by partition (see the module docstring)."""

    __slots__ = ("_config", "_events", "_ids", "_listeners", "_registry")

    def __init__(self, config: HostConfig, events: EventLog, registry: ServiceRegistry) -> None:
        self._config = config
        self._events = events
        self._registry = registry
        self._ids = itertools.count(1)
        self._listeners: dict[int, _Listener] = {}

    def listen(
        self,
        partition: _Partition,
        session: Session,
        vm_id: str,
        service_id: str,
        now: float,
        *,
        backlog: int | None,
        send_pages: int | None,
        recv_pages: int | None,
    ) -> tuple[ListenerInfo, list[Event]]:
        scope = validate_listen_scope(
            parse_guid(vm_id, what="listen VM id"), is_host=partition.is_host
        )
        sid = parse_guid(service_id, what="service id")
        if backlog is None:
            backlog = self._config.default_backlog
        if isinstance(backlog, bool) or not isinstance(backlog, int) or backlog < 0:
            raise InvalidArgument(f"backlog must be a non-negative integer, got {backlog!r}")
        effective_backlog = max(1, min(backlog, self._config.max_backlog))
        req_send = ring_request(self._config, send_pages, "send_pages")
        req_recv = ring_request(self._config, recv_pages, "recv_pages")
        if (
            partition.is_host
            and self._config.strict_registry
            and not self._registry.is_registered(sid)
        ):
            raise ServiceNotRegistered(
                f"service {sid} is not registered: in strict registry mode the host can listen "
                "only on registered services (register it with an element name first)"
            )
        for other in partition.by_service.get(sid, ()):
            if scopes_overlap(other.scope, scope, is_host=partition.is_host):
                raise AddressInUse(
                    f"({scope}, {sid}) overlaps listener {other.listener_id} on "
                    f"({other.scope}, {sid}) in partition {partition.vm_id}"
                )
        if sid in partition.local_ids:
            raise AddressInUse(
                f"service id {sid} is the local address of channel {partition.local_ids[sid]}"
            )
        partition.check_socket_room(self._config.max_socket_number, "listen")
        listener = _Listener(
            listener_id=next(self._ids),
            vm_id=partition.vm_id,
            session_id=session.session_id,
            scope=scope,
            service_id=sid,
            backlog=effective_backlog,
            send_pages=req_send,
            recv_pages=req_recv,
            created_at=now,
        )
        partition.listeners[listener.listener_id] = listener
        partition.by_service.setdefault(sid, []).append(listener)
        self._listeners[listener.listener_id] = listener
        out: list[Event] = []
        self._changed(out, listener, "listening", now, reason="listen")
        return listener.info(), out

    def owned(self, partition: _Partition, session: Session, listener_id: int) -> _Listener:
        """A listener of ``session``; another session's listener does not exist for it."""
        listener = partition.listeners.get(listener_id)
        if listener is None or listener.session_id != session.session_id:
            raise NotFound(
                f"no listener {listener_id} in session {session.session_id} of partition "
                f"{partition.vm_id}"
            )
        return listener

    def held(self, partition: _Partition, session_id: int | None) -> list[_Listener]:
        """The listeners of ``session_id`` in ``partition`` (of every session for None)."""
        return [
            listener
            for listener in partition.listeners.values()
            if session_id is None or listener.session_id == session_id
        ]

    def remove(
        self, partition: _Partition, listener: _Listener, now: float, *, reason: str
    ) -> list[Event]:
        """Forget a listener whose offers have all been refused."""
        assert not listener.pending, "refuse a listener's pending offers before removing it"
        del partition.listeners[listener.listener_id]
        siblings = partition.by_service[listener.service_id]
        siblings.remove(listener)
        if not siblings:
            del partition.by_service[listener.service_id]
        del self._listeners[listener.listener_id]
        out: list[Event] = []
        self._changed(out, listener, "closed", now, reason=reason)
        return out

    def _changed(
        self, out: list[Event], listener: _Listener, change: str, now: float, *, reason: str
    ) -> None:
        self._events.emit(
            out,
            ListenerChanged,
            now,
            listener_id=listener.listener_id,
            vm_id=listener.vm_id,
            local=listener.local,
            change=change,
            reason=reason,
        )

    def infos(self, partition: _Partition | None) -> list[ListenerInfo]:
        """Every listener (or ``partition``'s), by listener id."""
        listeners: Iterable[_Listener] = (
            self._listeners.values() if partition is None else partition.listeners.values()
        )
        return [listener.info() for listener in sorted(listeners, key=lambda x: x.listener_id)]

    # --- connects and the backlog -------------------------------------------------------------

    def taker(self, dest: _Partition, source: _Partition, service_id: str) -> _Listener | None:
        """The listener of ``dest`` that takes a connect from ``source`` now, or None if nobody
        would answer.

        For a loopback connect the caller's own (not yet counted) connecting end must fit
        beside the accepting end, hence ``reserve``.
        """
        reserve = 1 if dest is source else 0
        if dest.state is not PartitionState.RUNNING:
            return None  # a paused VM services nothing
        best: _Listener | None = None
        for listener in dest.by_service.get(service_id, ()):
            if scope_hears(
                listener.scope,
                listener_is_host=dest.is_host,
                listener_vm=dest.vm_id,
                source_vm=source.vm_id,
                source_is_host=source.is_host,
            ) and (best is None or scope_rank(listener.scope) < scope_rank(best.scope)):
                best = listener
        if best is None:
            return None
        if (
            dest.is_host
            and not source.is_host
            and self._config.strict_registry
            and not self._registry.is_registered(service_id)
        ):
            return None  # unregistered since listen: the registry gate refuses guests
        if len(best.pending) >= best.backlog:
            return None
        if dest.sockets + reserve >= self._config.max_socket_number:
            return None
        return best

    @staticmethod
    def offered(listener: _Listener, channel_id: int) -> None:
        """A channel was offered through ``listener``: it takes a backlog slot."""
        listener.pending.add(channel_id)

    def settled(self, listener_id: int | None, channel_id: int) -> None:
        """The offer of ``channel_id`` ended (accepted, refused, dropped, torn down): its
        backlog slot is free.  The listener may be gone already; then there is nothing to do."""
        if listener_id is None:
            return
        listener = self._listeners.get(listener_id)
        if listener is not None:
            listener.pending.discard(channel_id)
