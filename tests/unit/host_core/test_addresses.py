from __future__ import annotations

import uuid

import pytest

from host_service.core import (
    BROADCAST,
    CHILDREN,
    LOOPBACK,
    PARENT,
    SILOHOST,
    VMADDR_CID_ANY,
    VMADDR_CID_HOST,
    VSOCK_TEMPLATE,
    WELL_KNOWN_VM_IDS,
    WILDCARD,
    ZERO,
    Address,
    BadAddress,
    NetworkUnreachable,
    guid_from_bytes_le,
    guid_to_bytes_le,
    is_vsock_service_id,
    parse_guid,
    port_for_service_id,
    service_id_for_port,
    vm_id_for_cid,
)

pytestmark = pytest.mark.unit


def test_well_known_values_match_the_facts_file() -> None:
    # hvsock-facts section 1.2
    assert ZERO == WILDCARD == "00000000-0000-0000-0000-000000000000"
    assert BROADCAST == "ffffffff-ffff-ffff-ffff-ffffffffffff"
    assert CHILDREN == "90db8b89-0d35-4f79-8ce9-49ea0ac8b7cd"
    assert LOOPBACK == "e0e16197-dd56-4a10-9195-5ee7a155a838"
    assert PARENT == "a42e7cda-d03f-480c-9cc2-a4de20abb878"
    assert SILOHOST == "36bd0c5c-7276-4223-88ba-7d03b654c568"
    assert VSOCK_TEMPLATE == "00000000-facb-11e6-bd58-64006a7986d3"
    assert set(WELL_KNOWN_VM_IDS) == {WILDCARD, BROADCAST, CHILDREN, LOOPBACK, PARENT, SILOHOST}


@pytest.mark.parametrize(
    "text",
    [
        "A42E7CDA-D03F-480C-9CC2-A4DE20ABB878",  # CPython's constants are upper case
        "{a42e7cda-d03f-480c-9cc2-a4de20abb878}",
        "{A42E7CDA-d03f-480C-9cc2-A4DE20ABB878}",
        "  a42e7cda-d03f-480c-9cc2-a4de20abb878 ",
    ],
)
def test_parse_accepts_case_and_braces_and_reports_canonical(text: str) -> None:
    assert parse_guid(text) == PARENT


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not-a-guid",
        "a42e7cdad03f480c9cc2a4de20abb878",  # hyphen-less: uuid.UUID would accept it
        "urn:uuid:a42e7cda-d03f-480c-9cc2-a4de20abb878",
        "{a42e7cda-d03f-480c-9cc2-a4de20abb878",
        "a42e7cda-d03f-480c-9cc2-a4de20abb87",
        "a42e7cda-d03f-480c-9cc2-a4de20abb8789",
        "g42e7cda-d03f-480c-9cc2-a4de20abb878",
        "{{a42e7cda-d03f-480c-9cc2-a4de20abb878}}",
    ],
)
def test_parse_rejects_malformed(text: str) -> None:
    with pytest.raises(BadAddress) as info:
        parse_guid(text, what="VM id")
    assert "VM id" in str(info.value)
    assert info.value.errno == 22 and info.value.status == "INVALID_ARGUMENT"


@pytest.mark.parametrize("value", [None, 5, b"a42e7cda-d03f-480c-9cc2-a4de20abb878"])
def test_parse_rejects_non_strings(value: object) -> None:
    with pytest.raises(BadAddress, match="must be a string"):
        parse_guid(value)


@pytest.mark.parametrize(
    ("port", "guid"),
    [
        (80, "00000050-facb-11e6-bd58-64006a7986d3"),
        (2761, "00000ac9-facb-11e6-bd58-64006a7986d3"),  # Microsoft's example
        # hvsock-facts 1.4 quotes 50053 -> 0000c384 from a README; 50053 is 0xc385 (off by one).
        (50053, "0000c385-facb-11e6-bd58-64006a7986d3"),
        (0, VSOCK_TEMPLATE),
        (0xFFFFFFFF, "ffffffff-facb-11e6-bd58-64006a7986d3"),
    ],
)
def test_vsock_port_guid_round_trip(port: int, guid: str) -> None:
    assert service_id_for_port(port) == guid
    assert port_for_service_id(guid) == port
    assert port_for_service_id(guid.upper()) == port
    assert is_vsock_service_id(guid)


@pytest.mark.parametrize("port", [-1, 0x1_0000_0000, True, 1.5, "80"])
def test_vsock_port_out_of_range(port: object) -> None:
    with pytest.raises(BadAddress):
        service_id_for_port(port)  # type: ignore[arg-type]


def test_non_template_service_has_no_port() -> None:
    assert port_for_service_id(CHILDREN) is None
    assert not is_vsock_service_id(CHILDREN)


def test_wire_form_is_mixed_endian() -> None:
    # hvsock-facts 1.4: port 0x12345678 -> 78 56 34 12 cb fa e6 11 bd 58 64 00 6a 79 86 d3
    guid = service_id_for_port(0x12345678)
    wire = guid_to_bytes_le(guid)
    assert wire.hex(" ") == "78 56 34 12 cb fa e6 11 bd 58 64 00 6a 79 86 d3"
    assert guid_from_bytes_le(wire) == guid
    assert wire == uuid.UUID(guid).bytes_le
    with pytest.raises(BadAddress):
        guid_from_bytes_le(b"short")


def test_cid_mapping() -> None:
    assert vm_id_for_cid(VMADDR_CID_HOST) == PARENT
    assert vm_id_for_cid(VMADDR_CID_ANY) == WILDCARD
    with pytest.raises(NetworkUnreachable) as info:
        vm_id_for_cid(3)
    assert info.value.errno == 101  # ENETUNREACH


def test_address_parse_and_str() -> None:
    address = Address.parse("{A42E7CDA-D03F-480C-9CC2-A4DE20ABB878}", VSOCK_TEMPLATE.upper())
    assert address == Address(PARENT, VSOCK_TEMPLATE)
    assert str(address) == f"({PARENT}, {VSOCK_TEMPLATE})"
    with pytest.raises(BadAddress, match="service id"):
        Address.parse(PARENT, "nope")
