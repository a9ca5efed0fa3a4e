"""PROXY protocol v2 headers (HAProxy's specification, section 2.2) as the node reads them.

Each header travels over a real connected socket pair; what follows the header must stay
unread (it is the first PDU of the association, PS3.8 9.3). HAProxy itself sending
them to a node is in ``tests/test_cluster.py``.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest

from latentpacs.node.proxy import SIGNATURE, ProxyHeader, ProxyHeaderError, read_header

PDU_START = b"\x01\x00\x00\x00\x00\xcd"  # an A-ASSOCIATE-RQ's type and length


def _header(command: int, family: int, block: bytes) -> bytes:
    return SIGNATURE + bytes([0x20 | command, family]) + struct.pack(">H", len(block)) + block


def _read(data: bytes) -> tuple[ProxyHeader, bytes]:
    sender, receiver = socket.socketpair()
    with sender, receiver:
        sender.sendall(data)
        sender.shutdown(socket.SHUT_WR)
        receiver.settimeout(5)
        header = read_header(receiver)
        rest = b"".join(iter(lambda: receiver.recv(4096), b""))
    return header, rest


def test_tcp4_and_tcp6_sources_are_read_and_the_pdu_is_left_alone() -> None:
    ipv4 = (ipaddress.IPv4Address("192.0.2.10").packed + ipaddress.IPv4Address("10.0.0.1").packed
            + struct.pack(">HH", 50123, 11112))
    assert _read(_header(1, 0x11, ipv4) + PDU_START) == (
        ProxyHeader(False, ("192.0.2.10", 50123)), PDU_START)
    ipv6 = (ipaddress.IPv6Address("2001:db8::7").packed + ipaddress.IPv6Address("::1").packed
            + struct.pack(">HH", 4242, 11112) + b"\x04\x00\x01\x00")  # and a TLV (NOOP)
    assert _read(_header(1, 0x21, ipv6) + PDU_START) == (
        ProxyHeader(False, ("2001:db8::7", 4242)), PDU_START)


def test_local_and_unspec_name_no_source() -> None:
    assert _read(_header(0, 0x00, b"")) == (ProxyHeader(True, None), b"")
    assert _read(_header(1, 0x00, b"") + PDU_START) == (ProxyHeader(False, None), PDU_START)


@pytest.mark.parametrize("data, reason", [
    (PDU_START + b"\x00" * 10, "no PROXY protocol v2 signature"),        # a plain DICOM peer
    (b"PROXY TCP4 192.0.2.10 10.0.0.1 50123 11112\r\n", "signature"),   # version 1 text
    (SIGNATURE + b"\x11\x11\x00\x0c" + b"\x00" * 12, "version 1 command 1"),
    (_header(1, 0x11, b"\x00" * 8), "truncated"),                     # a TCP4 block of 8 bytes
    (_header(1, 0x11, b"\x00" * 12)[:20], "closed after 4 of 12"),    # the block never ends
])
def test_anything_else_is_refused(data: bytes, reason: str) -> None:
    with pytest.raises(ProxyHeaderError, match=reason) as caught:
        _read(data)
    assert not caught.value.empty


def test_a_connection_closed_at_once_is_a_health_check() -> None:
    with pytest.raises(ProxyHeaderError) as caught:
        _read(b"")
    assert caught.value.empty
