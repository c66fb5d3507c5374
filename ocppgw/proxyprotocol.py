"""
The PROXY protocol header a TCP load balancer puts in front of each
connection, believed only from the balancers themselves.

HAProxy (C{send-proxy}, C{send-proxy-v2}), AWS NLB and others open their
own TCP connection to the gateway and prepend a header naming the client
they relay: version 1 is one text line (C{PROXY TCP4 <source>
<destination> <source port> <destination port>\\r\\n}), version 2 a binary
block starting with a fixed 12-byte signature. The header comes before
anything else, TLS included. The address it carries becomes the charger's
address in logs, presence events, C{/chargers} and everything keyed on
it, so it is trusted only from C{[listener] trusted_proxies}:

- a connection whose TCP peer is not a trusted proxy is closed at once,
  before a byte is read (L{ProxyHeaderFactory.buildProtocol}): anyone
  who can reach the port directly could otherwise claim any address;
- a connection from a trusted proxy that does not start with a header
  (a balancer without C{send-proxy}) or whose header is malformed is
  closed when that is clear, usually on its first bytes.

Each refusal is counted and logged (L{ocppgw.refusals}). A header with no
address to give (v1 C{UNKNOWN}, v2 C{LOCAL} as in a balancer's own health
check, v2 C{UNSPEC}) leaves the connection's own addresses in place.

Twisted has a PROXY wrapper (C{twisted.protocols.haproxy}); this module
replaces it because it believes the header from anyone, drops a
connection whose header arrives split over several reads, and gives no
reason when it drops one.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Iterable, NamedTuple, Optional

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from ocppgw import refusals

#: The first 12 bytes of every version 2 header.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: How a version 1 header starts.
V1_PREFIX = b"PROXY "
#: The longest version 1 line, CRLF included (the specification's figure).
V1_MAX_LENGTH = 107
#: Where the loopback addresses are: the default of trusted_proxies.
LOOPBACK = ("127.0.0.0/8", "::1")

# version 2: address family and transport byte -> (address class, struct
# format of source, destination, source port, destination port)
_V2_FAMILIES = {
    0x11: (IPv4Address, "!4s4sHH"),  # TCP over IPv4
    0x21: (IPv6Address, "!16s16sHH"),  # TCP over IPv6
}
_V2_LOCAL, _V2_PROXY = 0x20, 0x21
_V2_UNSPEC = 0x00


class BadProxyHeader(Exception):
    """
    The connection does not start with a usable PROXY header.

    @ivar reason: L{refusals.PROXY_MISSING} or L{refusals.PROXY_INVALID}.
    @ivar detail: what is wrong, in a fixed phrase.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


class ProxyHeader(NamedTuple):
    """
    A parsed header: the relayed client (C{source}) and the address it
    connected to (C{destination}), both C{None} when the header gives none.
    """

    source: Optional[object]
    destination: Optional[object]
    length: int


def _invalid(detail: str) -> BadProxyHeader:
    return BadProxyHeader(refusals.PROXY_INVALID, detail)


def read_header(data: bytes) -> Optional[ProxyHeader]:
    """
    The PROXY header at the start of C{data}, or C{None} while C{data}
    is a beginning of one that is not complete yet.

    @raise BadProxyHeader: C{data} does not start with a header, or with a
        malformed one.
    """
    if data[:12] == V2_SIGNATURE[:len(data)]:
        return _read_v2(data)
    if data[:6] == V1_PREFIX[:len(data)]:
        return _read_v1(data)
    raise BadProxyHeader(refusals.PROXY_MISSING)


def _read_v2(data: bytes) -> Optional[ProxyHeader]:
    if len(data) < 16:
        return None
    command, family = data[12], data[13]
    (body_length,) = struct.unpack("!H", data[14:16])
    length = 16 + body_length
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise _invalid("unknown version or command")
    if len(data) < length:
        return None
    if command == _V2_LOCAL or family == _V2_UNSPEC:
        return ProxyHeader(None, None, length)
    known = _V2_FAMILIES.get(family)
    if known is None:
        raise _invalid("not TCP over IPv4 or IPv6")
    kind, layout = known
    if body_length < struct.calcsize(layout):
        raise _invalid("address block too short")
    source, destination, source_port, destination_port = struct.unpack_from(layout, data, 16)
    # the rest of the block are TLVs (unique id, TLS details): not needed
    return ProxyHeader(
        kind("TCP", str(ipaddress.ip_address(source)), source_port),
        kind("TCP", str(ipaddress.ip_address(destination)), destination_port),
        length,
    )


def _read_v1(data: bytes) -> Optional[ProxyHeader]:
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(data) >= V1_MAX_LENGTH:
            raise _invalid("version 1 line too long")
        return None
    words = data[:end].split(b" ")
    length = end + 2
    if len(words) >= 2 and words[1] == b"UNKNOWN":
        return ProxyHeader(None, None, length)
    if len(words) != 6 or words[1] not in (b"TCP4", b"TCP6"):
        raise _invalid("malformed version 1 line")
    kind, version = (IPv4Address, 4) if words[1] == b"TCP4" else (IPv6Address, 6)
    try:
        source, destination = (ipaddress.ip_address(w.decode("ascii")) for w in words[2:4])
        ports = [_port(w) for w in words[4:6]]
    except ValueError:
        raise _invalid("bad address or port in version 1 line") from None
    if source.version != version or destination.version != version:
        raise _invalid("address family does not match")
    return ProxyHeader(
        kind("TCP", str(source), ports[0]), kind("TCP", str(destination), ports[1]), length
    )


def _port(word: bytes) -> int:
    if not word.isdigit() or len(word) > 5 or (len(word) > 1 and word[:1] == b"0"):
        raise ValueError(word)
    port = int(word)
    if port > 65535:
        raise ValueError(word)
    return port


class TrustedProxies:
    """
    The addresses allowed to speak for someone else: to send a PROXY
    header, or a client certificate a TLS-ending proxy verified
    (C{[listener] trusted_proxies}, addresses or CIDR networks).
    """

    def __init__(self, networks: Iterable[str]) -> None:
        self._networks = [ipaddress.ip_network(n, strict=False) for n in networks]

    def trusts(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            return False
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)


class ProxyHeaderProtocol(ProtocolWrapper):
    """
    Reads the PROXY header, then passes everything on to the wrapped
    protocol, whose C{getPeer()}/C{getHost()} then give the header's
    addresses.

    The wrapped protocol is connected at once, so its opening handshake
    timeout also covers a proxy that never completes the header.
    """

    _header: Optional[ProxyHeader] = None
    _refused = False

    def __init__(self, factory, wrappedProtocol) -> None:
        super().__init__(factory, wrappedProtocol)
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        if self._header is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._refused:
            return
        buffer = self._buffer + data
        try:
            header = read_header(buffer)
        except BadProxyHeader as error:
            self._refused = True
            self._buffer = b""
            self.factory.refused(
                error.reason, refusals.peer_string(self.transport.getPeer()), error.detail
            )
            self.transport.loseConnection()
            return
        if header is None:
            self._buffer = buffer
            return
        self._header = header
        self._buffer = b""
        rest = buffer[header.length:]
        if rest:
            self.wrappedProtocol.dataReceived(rest)

    def getPeer(self):
        header = self._header
        if header is not None and header.source is not None:
            return header.source
        return self.transport.getPeer()

    def getHost(self):
        header = self._header
        if header is not None and header.destination is not None:
            return header.destination
        return self.transport.getHost()


class ProxyHeaderFactory(WrappingFactory):
    """
    Wraps a listener's factory: refuses connections from untrusted peers
    and reads the PROXY header of the others.

    @param refusals: the gateway's L{ocppgw.refusals.Refusals}.
    @param listener: the listener's name in metrics and logs.
    """

    protocol = ProxyHeaderProtocol

    def __init__(self, wrappedFactory, trusted: TrustedProxies, refusals, listener: str) -> None:
        super().__init__(wrappedFactory)
        self.trusted = trusted
        self._refusals = refusals
        self.listener = listener

    def buildProtocol(self, addr):
        if not self.trusted.trusts(getattr(addr, "host", "")):
            # None makes Twisted close the socket without reading from it.
            self.refused(refusals.PROXY_UNTRUSTED, refusals.peer_string(addr))
            return None
        return super().buildProtocol(addr)

    def refused(self, reason: str, peer: str, detail: str = "") -> None:
        self._refusals.refused(self.listener, reason, peer, detail or None)

    def logPrefix(self) -> str:
        return "PROXY"
