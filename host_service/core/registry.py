"""The service registry: the emulated ``GuestCommunicationServices`` registry key.

On Windows a service GUID must be registered (with a friendly ``ElementName``) before the host
accepts guest connections to it.  Here the gate is optional (``strict_registry``): when on, host
listeners need a registration and guest connects skip host listeners whose service has since been
unregistered.  Registering an existing service updates its element name, as writing the registry
value again would.
"""

from __future__ import annotations

from host_service.core.errors import InvalidArgument, NotFound
from host_service.core.types import ServiceRegistration
from hvsock_common.addresses import parse_guid

__all__ = ["MAX_ELEMENT_NAME", "ServiceRegistry"]

#: Registry value length limit we enforce for element names (characters).
MAX_ELEMENT_NAME = 256


class ServiceRegistry:
    __slots__ = ("_services",)

    def __init__(self) -> None:
        self._services: dict[str, ServiceRegistration] = {}

    def register(
        self, service_id: str, element_name: str, now: float
    ) -> tuple[ServiceRegistration, bool]:
        """Add or update a registration; returns it and whether it was new."""
        sid = parse_guid(service_id, what="service id")
        if not isinstance(element_name, str) or not element_name.strip():
            raise InvalidArgument("element_name must be a non-empty string")
        if len(element_name) > MAX_ELEMENT_NAME:
            raise InvalidArgument(f"element_name is longer than {MAX_ELEMENT_NAME} characters")
        previous = self._services.get(sid)
        registered_at = previous.registered_at if previous is not None else now
        registration = ServiceRegistration(sid, element_name, registered_at)
        self._services[sid] = registration
        return registration, previous is None

    def unregister(self, service_id: str) -> ServiceRegistration:
        sid = parse_guid(service_id, what="service id")
        try:
            return self._services.pop(sid)
        except KeyError:
            raise NotFound(f"service {sid} is not registered") from None

    def get(self, service_id: str) -> ServiceRegistration:
        sid = parse_guid(service_id, what="service id")
        try:
            return self._services[sid]
        except KeyError:
            raise NotFound(f"service {sid} is not registered") from None

    def is_registered(self, canonical_service_id: str) -> bool:
        return canonical_service_id in self._services

    def list(self) -> list[ServiceRegistration]:
        return sorted(self._services.values(), key=lambda r: r.service_id)
