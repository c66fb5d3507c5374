"""
Tests for L{ocppgw.resumption}: reading the ticket a ClientHello offers,
learning a context's ticket key, and chargers resuming their TLS session
against a running gateway (real TLS sockets, Python's C{ssl} as the
charger, which says whether OpenSSL resumed the session).
"""

from __future__ import annotations

import os
import ssl

from OpenSSL import SSL
from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from ocppgw.config import ConfigError, settings_from_dict
from ocppgw.resumption import (
    INCOMPLETE, KEY_NAME_LENGTH, MAX_HELLO, offered_ticket,
)
from ocppgw.tls import ServerTLS, TLSFiles
from tests import rawclient
from tests.certs import ThrowAwayPKI
from tests.test_security import SecurityTestCase


def _client_context(version: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = context.maximum_version = version
    return context


def _client_hello(issued=None) -> bytes:
    """
    The ClientHello a client sends, offering the session of C{issued}
    (from L{_issued}).
    """
    context, session = issued or (_client_context(ssl.TLSVersion.TLSv1_3), None)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, session=session)
    try:
        client.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def _handshake(peer: SSL.Connection, version: ssl.TLSVersion) -> tuple:
    """
    A client's handshake with the server connection C{peer}, in memory:
    the client's context and its C{SSLObject}.
    """
    context = _client_context(version)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing)
    peer.set_accept_state()
    for _ in range(8):
        try:
            client.do_handshake()
        except ssl.SSLWantReadError:
            pass
        sent = outgoing.read()
        if sent:
            peer.bio_write(sent)
        try:
            peer.do_handshake()
        except SSL.WantReadError:
            pass
        try:
            incoming.write(peer.bio_read(1 << 16))
        except SSL.WantReadError:
            pass
    try:
        client.read(1)  # TLS 1.3 tickets follow the handshake
    except ssl.SSLWantReadError:
        pass
    return context, client


def _issued(server: ServerTLS, version: ssl.TLSVersion) -> tuple:
    """
    A client context and a session (with its ticket) that C{server}'s
    current context issued to it.
    """
    context, client = _handshake(server.serverConnectionForTLS(None), version)
    return context, client.session


class OfferedTicketTests(SynchronousTestCase):
    def setUp(self):
        pki = ThrowAwayPKI(os.path.abspath(self.mktemp()))
        server = pki.issue("localhost", server=True, kind="ec")
        self.tls = ServerTLS(TLSFiles(certfile=server.certfile, keyfile=server.keyfile))

    def test_ticketOfTLS13(self):
        """
        A TLS 1.3 ClientHello's pre-shared key identity is the ticket; its
        first bytes name the key of the context that issued it.
        """
        ticket = offered_ticket(_client_hello(_issued(self.tls, ssl.TLSVersion.TLSv1_3)))
        self.assertIsInstance(ticket, bytes)
        self.assertEqual(ticket[:KEY_NAME_LENGTH], self.tls.ticket_key_name)

    def test_ticketOfTLS12(self):
        """A TLS 1.2 ClientHello carries the ticket in its SessionTicket extension."""
        ticket = offered_ticket(_client_hello(_issued(self.tls, ssl.TLSVersion.TLSv1_2)))
        self.assertEqual(ticket[:KEY_NAME_LENGTH], self.tls.ticket_key_name)

    def test_noTicket(self):
        self.assertIsNone(offered_ticket(_client_hello()))

    def test_incomplete(self):
        """Until the whole ClientHello has arrived, the answer is "more"."""
        hello = _client_hello(_issued(self.tls, ssl.TLSVersion.TLSv1_3))
        for end in (0, 1, 4, 5, 9, len(hello) - 1):
            self.assertIs(offered_ticket(hello[:end]), INCOMPLETE, end)
        self.assertIsInstance(offered_ticket(hello), bytes)

    def test_helloInSeveralRecords(self):
        """A ClientHello split over two handshake records is read whole."""
        hello = _client_hello(_issued(self.tls, ssl.TLSVersion.TLSv1_3))
        body = hello[5:]
        split = (hello[:3] + (100).to_bytes(2, "big") + body[:100]
                 + hello[:3] + (len(body) - 100).to_bytes(2, "big") + body[100:])
        self.assertEqual(offered_ticket(split), offered_ticket(hello))

    def test_notTLS(self):
        """Anything else is left to OpenSSL, at once or at the size limit."""
        self.assertIsNone(offered_ticket(b"GET / HTTP/1.1\r\n\r\n"))
        self.assertIsNone(offered_ticket(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00"))
        endless = b"\x16\x03\x01\xff\xff" + b"\x01\xff\xff\xff"
        self.assertIs(offered_ticket(endless), INCOMPLETE)
        self.assertIsNone(offered_ticket(endless + b"\0" * MAX_HELLO))
        self.assertIsNone(offered_ticket(b"\x16\x03\x01\x00\x06\x01\x00\x00\x02\x03\x03"))

    def test_keyNamePerContext(self):
        """Each context has a key of its own; a reload makes a new one."""
        first = self.tls.ticket_key_name
        self.assertEqual(len(first), KEY_NAME_LENGTH)
        self.assertTrue(self.tls.reload())
        self.assertNotEqual(self.tls.ticket_key_name, first)

    def test_previousKeyForSessionTimeout(self):
        """
        The context before a reload serves the tickets it issued for
        C{ssl.session_timeout} (when they have all expired), no longer.
        """
        clock = task.Clock()
        tls = ServerTLS(TLSFiles(certfile=self.tls.files.certfile,
                                 keyfile=self.tls.files.keyfile, session_timeout=60), clock)
        before = tls.ticket_key_name
        self.assertTrue(tls.reload())
        self.assertIsNone(tls.connection_for(tls.ticket_key_name))
        clock.advance(59)
        self.assertIsInstance(tls.connection_for(before), SSL.Connection)
        clock.advance(1)
        self.assertIsNone(tls.connection_for(before))

    def test_noTicketsNoKey(self):
        tls = ServerTLS(TLSFiles(certfile=self.tls.files.certfile,
                                 keyfile=self.tls.files.keyfile, session_tickets=False))
        self.assertIsNone(tls.ticket_key_name)


class SettingsTests(SynchronousTestCase):
    def test_timeoutMustBePositive(self):
        with self.assertRaises(ConfigError) as caught:
            settings_from_dict({"listener": {"ssl.session_timeout": "0"}})
        self.assertIn("listener.ssl.session_timeout", str(caught.exception))


class ResumptionTests(SecurityTestCase):
    """A charger that keeps its TLS session resumes it (profile 3 here)."""

    #: more than the listener's defaults, per test class
    listener: dict = {}

    def security_settings(self) -> dict:
        self.charger_id = self.identity("RES")
        self.server = self.pki.issue("localhost", server=True, kind="ec")
        self.mine = self.pki.issue(self.charger_id, kind="ec")
        return {
            "listener": {
                "tcp.enabled": "false", "ssl.enabled": "true", "ssl.port": "0",
                "ssl.profile": "3", "ssl.certfile": self.server.certfile,
                "ssl.keyfile": self.server.keyfile, "ssl.cacertfile": self.pki.cafile,
                **self.listener,
            },
        }

    def context(self, maximum=None, tickets=True):
        context = rawclient.client_context(
            self.pki.cafile, certfile=self.mine.certfile, keyfile=self.mine.keyfile,
            maximum=maximum,
        )
        if not tickets:
            context.options |= ssl.OP_NO_TICKET
        return context

    @defer.inlineCallbacks
    def connect(self, context, session=None):
        response = yield rawclient.handshake(
            self.port_of("ssl"), self.path(self.charger_id), context=context, session=session,
        )
        self.assertEqual(response.status, 101)
        return response

    @defer.inlineCallbacks
    def assertResumes(self, context):
        first = yield self.connect(context)
        self.assertFalse(first.session_reused)
        again = yield self.connect(context, first.session)
        self.assertTrue(again.session_reused)

    def reload(self):
        self.assertTrue(self.gateway_service.security.tls.reload())

    def test_tls13(self):
        """
        A resumed TLS 1.3 session still names its charger: the identity
        comes from the certificate the session was verified with.
        """
        return self.assertResumes(self.context())

    def test_tls12Ticket(self):
        return self.assertResumes(self.context(ssl.TLSVersion.TLSv1_2))

    def test_tls12SessionId(self):
        """A TLS 1.2 client that takes no tickets resumes from the cache."""
        return self.assertResumes(self.context(ssl.TLSVersion.TLSv1_2, tickets=False))

    @defer.inlineCallbacks
    def test_previousKeyAfterReload(self):
        """
        A ticket issued before a reload (SIGHUP) resumes after it; one
        issued two reloads ago does not; a charger that connected after
        the reload resumes with the new key.
        """
        context = self.context()
        before = yield self.connect(context)
        self.reload()
        resumed = yield self.connect(context, before.session)
        self.assertTrue(resumed.session_reused)
        fresh = yield self.connect(context)
        self.assertFalse(fresh.session_reused)
        self.reload()
        stale = yield self.connect(context, before.session)
        self.assertFalse(stale.session_reused)
        kept = yield self.connect(context, fresh.session)
        self.assertTrue(kept.session_reused)

    @defer.inlineCallbacks
    def test_newTrustDropsPreviousKey(self):
        """
        A reload that changes the CA bundle (or CRL) of a listener that
        verifies client certificates resumes no session verified before.
        """
        context = self.context()
        before = yield self.connect(context)
        with open(self.pki.cafile, "ab") as bundle:
            bundle.write(open(ThrowAwayPKI(os.path.join(self.directory, "more"),
                                           "Another CA").cafile, "rb").read())
        self.reload()
        again = yield self.connect(context, before.session)
        self.assertFalse(again.session_reused)


class ResumptionOffTests(ResumptionTests):
    """C{ssl.session_tickets} and C{ssl.session_cache} off: full handshakes."""

    listener = {"ssl.session_tickets": "false", "ssl.session_cache": "false"}

    @defer.inlineCallbacks
    def assertResumes(self, context):
        first = yield self.connect(context)
        again = yield self.connect(context, first.session)
        self.assertFalse(again.session_reused)

    def test_previousKeyAfterReload(self):
        return self.assertResumes(self.context())

    def test_newTrustDropsPreviousKey(self):
        return self.assertResumes(self.context(ssl.TLSVersion.TLSv1_2))
