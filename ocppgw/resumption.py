"""
TLS session resumption on the wss:// listener.

A charger that reconnects after a blip and still holds its TLS session
(a session ticket, or a session id for TLS 1.2 clients that take no
tickets) offers it in its ClientHello; when the gateway accepts it the
handshake skips the certificate exchange and the key agreement, which are
most of a full handshake's CPU (the signature with the server key, the
ECDHE, and with profile 3 the verification of the charger's chain).
Resuming does not skip anything a charger is asked for after TLS: Basic
credentials (profile 2) are checked on every WebSocket handshake, and a
resumed session carries the client certificate it was verified with, so
the certificate's identity is still matched against the URL (profile 3).

What OpenSSL is asked to do (L{configure}):

- C{ssl.session_tickets}: stateless tickets (RFC 5077, and the TLS 1.3
  NewSessionTicket), encrypted with a key of the TLS context;
- C{ssl.session_cache}: a server-side cache of sessions by session id (at
  most 20,480, OpenSSL's default, oldest dropped), for TLS 1.2 clients
  that do not take tickets; with tickets off, TLS 1.3 resumes from this
  cache too;
- C{ssl.session_timeout}: how long a session may be resumed. It also
  bounds how long a client certificate that a new CRL revokes can go on
  resuming the session it was verified in.

The ticket key: the Python binding of OpenSSL the gateway runs on
(pyOpenSSL over C{cryptography}, which links its own OpenSSL statically)
offers no call to set, read or share a ticket key
(C{SSL_CTX_set_tlsext_ticket_keys}, C{SSL_CTX_set_tlsext_ticket_key_cb})
nor an external session cache (C{SSL_CTX_sess_set_get_cb}). OpenSSL makes
a random ticket key for each TLS context. So:

- a ticket is resumed by the process that issued it: with
  C{[listener] workers} above 1, a charger that returns to another worker
  (the kernel picks one per connection) makes a full handshake, and so
  does every charger after a restart of the gateway. C{[listener]
  worker_affinity = source_address} has the kernel pick the worker by the
  client's address alone (L{ocppgw.workers.source_address_program}), so
  a charger that reconnects from the same address returns to the worker
  that holds its ticket's key;
- SIGHUP builds a new context (new certificates, CA bundle, CRL), which
  rotates the key. L{ocppgw.tls.ServerTLS} keeps the previous context for
  C{ssl.session_timeout}, and L{ResumingTLSProtocol} reads the ticket a
  ClientHello offers (its first 16 bytes name the key that encrypted it)
  before OpenSSL sees it, so a ticket issued before the reload is resumed
  in the context that issued it, under the trust material its client
  certificate was verified with. A ticket two reloads old names no kept
  key: a full handshake. When a reload changes the CA bundle or the CRL
  of a listener that verifies client certificates, the previous context
  is dropped instead: sessions verified under the old trust are not
  resumed.
- the key of a context is learnt once, when the context is built, from a
  ticket it issues to a client in memory (L{ticket_key_name}).
"""

from __future__ import annotations

from typing import Optional, Union

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi, lib as _lib
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol

#: Length of OpenSSL's ticket key name, the first bytes of each ticket it
#: issues (key name, IV, encrypted session, HMAC).
KEY_NAME_LENGTH = 16

#: The most ClientHello bytes buffered before giving up on reading it: a
#: ClientHello is one handshake message of at most 2^14 bytes in practice
#: (a post-quantum key share makes it ~1.8 KB); more is left to OpenSSL.
MAX_HELLO = 1 << 16

#: TLS record content type of handshake messages, and the ClientHello type.
_HANDSHAKE, _CLIENT_HELLO = 22, 1
#: ClientHello extensions carrying a ticket (RFC 5077; RFC 8446 4.2.11).
_SESSION_TICKET, _PRE_SHARED_KEY = 35, 41


def configure(context: SSL.Context, *, cache: bool, tickets: bool, timeout: float) -> None:
    """
    Turn session resumption on C{context} on or off, as the
    C{ssl.session_*} keys say.
    """
    context.set_session_cache_mode(SSL.SESS_CACHE_SERVER if cache else SSL.SESS_CACHE_OFF)
    if not tickets:
        context.set_options(SSL.OP_NO_TICKET)
    context.set_timeout(max(1, int(timeout)))


# -- which key a ClientHello's ticket was made with --------------------------


class _Incomplete(Exception):
    pass


#: L{offered_ticket}'s answer while the ClientHello has not fully arrived.
INCOMPLETE = object()


def offered_ticket(data: bytes) -> Union[object, bytes, None]:
    """
    The session ticket (TLS 1.2) or first pre-shared key identity (TLS
    1.3) the ClientHello at the start of C{data} offers.

    @return: the ticket; C{None} when there is none, or C{data} is not a
        ClientHello (OpenSSL will say why); L{INCOMPLETE} when more bytes
        are needed.
    """
    try:
        return _ticket_of(_client_hello(data))
    except _Incomplete:
        return INCOMPLETE if len(data) < MAX_HELLO else None
    except (IndexError, ValueError):
        return None


def _client_hello(data: bytes) -> bytes:
    """The ClientHello body, joined from as many handshake records as it spans."""
    message = b""
    position = 0
    while True:
        if len(data) < position + 5:
            raise _Incomplete()
        if data[position] != _HANDSHAKE:
            raise ValueError("not a handshake record")
        length = int.from_bytes(data[position + 3:position + 5], "big")
        end = position + 5 + length
        message += data[position + 5:end]
        if len(data) < end:
            raise _Incomplete()
        position = end
        if len(message) >= 4:
            if message[0] != _CLIENT_HELLO:
                raise ValueError("not a ClientHello")
            size = int.from_bytes(message[1:4], "big")
            if len(message) >= 4 + size:
                return message[4:4 + size]


def _ticket_of(hello: bytes) -> Optional[bytes]:
    position = 2 + 32  # legacy_version, random
    position += 1 + hello[position]  # legacy_session_id
    position += 2 + int.from_bytes(hello[position:position + 2], "big")  # cipher_suites
    position += 1 + hello[position]  # legacy_compression_methods
    end = position + 2 + int.from_bytes(hello[position:position + 2], "big")
    position += 2
    while position + 4 <= end:
        kind = int.from_bytes(hello[position:position + 2], "big")
        size = int.from_bytes(hello[position + 2:position + 4], "big")
        body = hello[position + 4:position + 4 + size]
        position += 4 + size
        if kind == _SESSION_TICKET and body:
            return body
        if kind == _PRE_SHARED_KEY and len(body) >= 4:
            # identities<7..2^16-1>: the first identity<1..2^16-1>
            first = int.from_bytes(body[2:4], "big")
            return body[4:4 + first] or None
    return None


# -- the key of a context ----------------------------------------------------


def ticket_key_name(context: SSL.Context, tls13: bool) -> Optional[bytes]:
    """
    The name of the key C{context} encrypts tickets with: the first bytes
    of a ticket it issues to a client run in memory (Python cannot ask
    OpenSSL for the key itself).

    @param tls13: make the probe's handshake in TLS 1.3 (for a context
        that accepts nothing older).
    @return: the name, or C{None} when the context issues no tickets.
    """
    client_context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    version = SSL.TLS1_3_VERSION if tls13 else SSL.TLS1_2_VERSION
    client_context.set_min_proto_version(version)
    client_context.set_max_proto_version(version)
    client = SSL.Connection(client_context, None)
    client.set_connect_state()
    server = SSL.Connection(context, None)
    # a profile 3 context asks for a client certificate the probe has not
    server.set_verify(SSL.VERIFY_NONE)
    server.set_accept_state()
    for _ in range(8):
        for side in (client, server):
            try:
                side.do_handshake()
            except SSL.WantReadError:
                pass
            except SSL.Error:
                return None
        _shuttle(client, server)
        _shuttle(server, client)
    try:
        client.recv(1)  # TLS 1.3 tickets follow the handshake
    except (SSL.WantReadError, SSL.Error):
        pass
    session = client.get_session()
    if session is None:
        return None
    ticket = _session_ticket(_der(session))
    if not ticket or len(ticket) < KEY_NAME_LENGTH:
        return None
    return ticket[:KEY_NAME_LENGTH]


def _shuttle(source: SSL.Connection, target: SSL.Connection) -> None:
    try:
        data = source.bio_read(1 << 16)
    except SSL.WantReadError:
        return
    target.bio_write(data)


def _der(session: SSL.Session) -> bytes:
    handle = session._session
    size = _lib.i2d_SSL_SESSION(handle, _ffi.NULL)
    buffer = _ffi.new("unsigned char[]", size)
    cursor = _ffi.new("unsigned char **", buffer)
    _lib.i2d_SSL_SESSION(handle, cursor)
    return bytes(_ffi.buffer(buffer, size))


def _session_ticket(der: bytes) -> Optional[bytes]:
    """
    The ticket in a DER SSL_SESSION (OpenSSL's ASN.1: a SEQUENCE whose
    field C{[10] EXPLICIT OCTET STRING} is the ticket).
    """
    _tag, body, _rest = _tlv(der)
    while body:
        tag, value, body = _tlv(body)
        if tag == 0xAA:  # context-specific, constructed, 10
            _inner, ticket, _ = _tlv(value)
            return ticket
    return None


def _tlv(data: bytes) -> tuple:
    tag, length = data[0], data[1]
    position = 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[2:2 + count], "big")
        position += count
    return tag, data[position:position + length], data[position + length:]


# -- the TLS protocol of the wss:// listener ----------------------------------


class ResumingTLSProtocol(TLSMemoryBIOProtocol):
    """
    A server TLS connection that keeps its session resumable and sends a
    ticket to the context that issued it.

    It reads the ClientHello before OpenSSL does and, when its ticket names
    the key of the context kept from before a reload, runs the handshake
    on that context instead of the current one. The swap happens before
    any byte has reached OpenSSL, so the connection that
    L{TLSMemoryBIOProtocol} made on connect has not said anything yet and
    can be dropped.
    """

    _routed = False
    _hello = b""

    def dataReceived(self, data: bytes) -> None:
        if not self._routed:
            data = self._hello + data
            ticket = offered_ticket(data)
            if ticket is INCOMPLETE:
                self._hello = data
                return
            self._routed = True
            self._hello = b""
            if ticket is not None:
                kept = self.factory.keys.connection_for(ticket[:KEY_NAME_LENGTH])
                if kept is not None:
                    self._tlsConnection = kept
        super().dataReceived(data)

    def connectionLost(self, reason) -> None:
        connection = self._tlsConnection
        failure = self._reason or reason
        if connection is not None and self._handshakeDone and not failure.check(SSL.Error):
            # OpenSSL forgets the cached session of a connection that ends
            # without a close_notify, yet that is how a charger's link
            # drops, and TLS 1.1 on allows resuming such a session (RFC
            # 5246, 7.2.1). A TLS error still makes OpenSSL forget it.
            connection.set_shutdown(SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN)
        super().connectionLost(reason)


class ResumingTLSFactory(TLSMemoryBIOFactory):
    """
    L{TLSMemoryBIOFactory} of L{ResumingTLSProtocol}s, for a server whose
    C{keys} (an L{ocppgw.tls.ServerTLS}) may keep the context from before
    a reload.
    """

    protocol = ResumingTLSProtocol

    def __init__(self, keys, wrappedFactory) -> None:
        super().__init__(keys, False, wrappedFactory)
        self.keys = keys
