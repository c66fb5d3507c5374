"""
L{ocppgw.proxyprotocol} in memory: parsing PROXY v1 and v2 headers (whole,
split over reads, malformed), the trust rule, and the wrapper's addresses.
"""

from __future__ import annotations

import socket
import struct

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from ocppgw import refusals
from ocppgw.proxyprotocol import (
    BadProxyHeader,
    ProxyHeaderFactory,
    TrustedProxies,
    V2_SIGNATURE,
    read_header,
)
from tests import rawclient


def v2(command=0x21, family=0x11, body=b"") -> bytes:
    return V2_SIGNATURE + bytes([command, family]) + struct.pack("!H", len(body)) + body


def v2_tcp6(source: str, source_port: int, tlvs: bytes = b"") -> bytes:
    body = (socket.inet_pton(socket.AF_INET6, source)
            + socket.inet_pton(socket.AF_INET6, "2001:db8::1")
            + struct.pack("!HH", source_port, 443) + tlvs)
    return v2(family=0x21, body=body)


class ReadHeaderTests(unittest.SynchronousTestCase):
    def assertBad(self, data: bytes, reason: str) -> BadProxyHeader:
        error = self.assertRaises(BadProxyHeader, read_header, data)
        self.assertEqual(error.reason, reason)
        return error

    def test_v1Tcp4(self):
        data = rawclient.proxy_v1("203.0.113.7", 40123) + b"GET /"
        header = read_header(data)
        self.assertEqual(header.source, IPv4Address("TCP", "203.0.113.7", 40123))
        self.assertEqual(header.destination, IPv4Address("TCP", "192.0.2.1", 443))
        self.assertEqual(data[header.length:], b"GET /")

    def test_v1Tcp6(self):
        header = read_header(b"PROXY TCP6 2001:db8::7 2001:db8::1 5000 443\r\n")
        self.assertEqual(header.source, IPv6Address("TCP", "2001:db8::7", 5000))

    def test_v1Unknown(self):
        header = read_header(b"PROXY UNKNOWN\r\n")
        self.assertEqual((header.source, header.destination, header.length), (None, None, 15))

    def test_v2Tcp4(self):
        data = rawclient.proxy_v2("203.0.113.7", 40123) + b"\x16\x03"
        header = read_header(data)
        self.assertEqual(header.source, IPv4Address("TCP", "203.0.113.7", 40123))
        self.assertEqual(data[header.length:], b"\x16\x03")

    def test_v2Tcp6WithTlvs(self):
        tlvs = b"\x05\x00\x04abcd"  # PP2_TYPE_UNIQUE_ID, skipped
        data = v2_tcp6("2001:db8::7", 5000, tlvs) + b"GET"
        header = read_header(data)
        self.assertEqual(header.source, IPv6Address("TCP", "2001:db8::7", 5000))
        self.assertEqual(data[header.length:], b"GET")

    def test_v2LocalAndUnspec(self):
        for data in (rawclient.proxy_v2_local(), v2(family=0x00, body=b"\x00" * 4)):
            header = read_header(data)
            self.assertEqual((header.source, header.length), (None, len(data)))

    def test_everyPrefixIsIncomplete(self):
        for whole in (rawclient.proxy_v1("203.0.113.7", 1), rawclient.proxy_v2("203.0.113.7", 1),
                      v2_tcp6("2001:db8::7", 5000)):
            for end in range(1, len(whole)):
                self.assertIsNone(read_header(whole[:end]), (whole, end))
            self.assertIsNotNone(read_header(whole))

    def test_missing(self):
        for data in (b"GET /ocpp/CP1 HTTP/1.1\r\n", b"\x16\x03\x01\x02", b"PROXX", b"\r\n\r\nX"):
            self.assertBad(data, refusals.PROXY_MISSING)

    def test_invalid(self):
        for data, detail in (
            (v2(command=0x11), "unknown version or command"),
            (v2(command=0x22), "unknown version or command"),
            (v2(family=0x31, body=bytes(216)), "not TCP over IPv4 or IPv6"),
            (v2(family=0x12, body=bytes(12)), "not TCP over IPv4 or IPv6"),
            (v2(family=0x11, body=bytes(8)), "address block too short"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "malformed version 1 line"),
            (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "malformed version 1 line"),
            (b"PROXY TCP4 1.2.3.999 5.6.7.8 1 2\r\n", "bad address or port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "bad address or port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "bad address or port"),
            (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "address family does not match"),
            (b"PROXY " + b"x" * 101, "version 1 line too long"),
        ):
            error = self.assertBad(data, refusals.PROXY_INVALID)
            self.assertIn(detail, error.detail)


class TrustedProxiesTests(unittest.SynchronousTestCase):
    def test_addressesAndNetworks(self):
        trusted = TrustedProxies(["10.1.0.0/16", "192.0.2.5", "2001:db8::/32"])
        for host in ("10.1.2.3", "192.0.2.5", "2001:db8::9", "::ffff:10.1.0.1"):
            self.assertTrue(trusted.trusts(host), host)
        for host in ("10.2.0.1", "192.0.2.6", "2001:db9::1", "", "not-an-address"):
            self.assertFalse(trusted.trusts(host), host)


class _Recorder(Protocol):
    def __init__(self):
        self.data = b""

    def dataReceived(self, data):
        self.data += data


class _Refusals:
    def __init__(self):
        self.seen = []

    def refused(self, listener, reason, peer, detail=None, **fields):
        self.seen.append((listener, reason, peer, detail))


class WrapperTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.refusals = _Refusals()
        self.factory = ProxyHeaderFactory(
            Factory.forProtocol(_Recorder), TrustedProxies(["127.0.0.1"]), self.refusals, "ws"
        )

    def connect(self, host="127.0.0.1"):
        address = IPv4Address("TCP", host, 50000)
        protocol = self.factory.buildProtocol(address)
        if protocol is None:
            return None, None
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        return protocol, transport

    def test_untrustedNotBuilt(self):
        self.assertEqual(self.connect("127.0.0.2"), (None, None))
        self.assertEqual(self.refusals.seen,
                         [("ws", refusals.PROXY_UNTRUSTED, "tcp4:127.0.0.2:50000", None)])

    def test_headerByteByByte(self):
        protocol, transport = self.connect()
        data = rawclient.proxy_v2("203.0.113.7", 40123) + b"GET / HTTP/1.1\r\n"
        for i in range(len(data)):
            protocol.dataReceived(data[i:i + 1])
        self.assertEqual(protocol.wrappedProtocol.data, b"GET / HTTP/1.1\r\n")
        self.assertEqual(protocol.getPeer(), IPv4Address("TCP", "203.0.113.7", 40123))
        self.assertEqual(protocol.getHost(), IPv4Address("TCP", "192.0.2.1", 443))
        self.assertFalse(transport.disconnecting)

    def test_missingHeaderClosed(self):
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET / HTTP/1.1\r\n")
        protocol.dataReceived(b"Host: x\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(protocol.wrappedProtocol.data, b"")
        self.assertEqual(self.refusals.seen,
                         [("ws", refusals.PROXY_MISSING, "tcp4:127.0.0.1:50000", None)])

    def test_localKeepsTransportAddress(self):
        protocol, _ = self.connect()
        protocol.dataReceived(rawclient.proxy_v2_local())
        self.assertEqual(protocol.getPeer(), IPv4Address("TCP", "127.0.0.1", 50000))
