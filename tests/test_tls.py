"""
Tests for L{ocppgw.tls}: building contexts from files, clear errors, and
reloads that keep the old material when the new one is broken.
"""

from __future__ import annotations

import os

from OpenSSL import SSL
from twisted.trial.unittest import SynchronousTestCase

from ocppgw.tls import ServerTLS, TLSConfigError, TLSFiles, build_context
from tests.certs import ThrowAwayPKI


def _handshake(server_context: SSL.Context, version: int) -> str:
    """
    A TLS handshake in memory with a client that speaks only C{version};
    the version agreed, or L{SSL.Error}.
    """
    client_context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    client_context.set_min_proto_version(version)
    client_context.set_max_proto_version(version)
    client_context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    client = SSL.Connection(client_context, None)
    client.set_connect_state()
    server = SSL.Connection(server_context, None)
    server.set_accept_state()
    for _ in range(10):
        for one, other in ((client, server), (server, client)):
            try:
                one.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                other.bio_write(one.bio_read(65536))
            except SSL.WantReadError:
                pass
    return server.get_protocol_version_name()


class ContextTests(SynchronousTestCase):
    def setUp(self):
        self.pki = ThrowAwayPKI(os.path.abspath(self.mktemp()))
        self.server = self.pki.issue("localhost", server=True, kind="rsa",
                                     password=b"secret")
        self.password_file = os.path.join(self.pki.directory, "password")
        with open(self.password_file, "w") as file:
            file.write("secret\n")

    def files(self, **changes) -> TLSFiles:
        values = dict(certfile=self.server.certfile, keyfile=self.server.keyfile,
                      password_file=self.password_file)
        values.update(changes)
        return TLSFiles(**values)

    def test_encryptedKey(self):
        self.assertIsInstance(build_context(self.files()), SSL.Context)

    def test_wrongKeyPassword(self):
        with open(self.password_file, "w") as file:
            file.write("wrong\n")
        error = self.assertRaises(TLSConfigError, build_context, self.files())
        self.assertIn("wrong password", str(error))

    def test_keyOfAnotherCertificate(self):
        other = self.pki.issue("localhost", server=True, kind="rsa")
        error = self.assertRaises(TLSConfigError, build_context,
                                  self.files(keyfile=other.keyfile, password_file=""))
        self.assertIn("does not match", str(error))

    def test_notACertificate(self):
        error = self.assertRaises(TLSConfigError, build_context,
                                  self.files(certfile=self.password_file))
        self.assertIn("not a PEM certificate chain", str(error))

    def test_badCrl(self):
        error = self.assertRaises(TLSConfigError, build_context, self.files(
            cacertfile=self.pki.cafile, verify_peer=True, crlfile=self.password_file))
        self.assertIn("certificate revocation list", str(error))

    def test_unknownCiphers(self):
        """A cipher list OpenSSL finds nothing in is refused, naming ssl.ciphers."""
        error = self.assertRaises(TLSConfigError, build_context,
                                  self.files(ciphers="NO-SUCH-SUITE"))
        self.assertIn("ssl.ciphers", str(error))

    def test_minVersion(self):
        """
        ssl.min_version is the oldest version a handshake gets; TLS 1.0
        needs OpenSSL's security level 0, which is added unless the
        cipher list sets a level itself.
        """
        tls10, tls12 = SSL.TLS1_VERSION, SSL.TLS1_2_VERSION
        self.assertEqual(_handshake(build_context(self.files()), tls12), "TLSv1.2")
        self.assertRaises(SSL.Error, _handshake, build_context(self.files()), tls10)
        legacy = build_context(self.files(min_version="TLSv1", ciphers="DEFAULT"))
        self.assertEqual(_handshake(legacy, tls10), "TLSv1")
        level1 = build_context(self.files(min_version="TLSv1", ciphers="DEFAULT:@SECLEVEL=1"))
        self.assertRaises(SSL.Error, _handshake, level1, tls10)
        modern = build_context(self.files(min_version="TLSv1.3"))
        self.assertRaises(SSL.Error, _handshake, modern, tls12)

    def test_reloadKeepsOldMaterialOnError(self):
        tls = ServerTLS(self.files())
        before = tls._context
        with open(self.server.certfile, "w") as file:
            file.write("broken\n")
        self.assertFalse(tls.reload())
        self.assertIs(tls._context, before)

    def test_reloadSwapsContext(self):
        tls = ServerTLS(self.files())
        before = tls._context
        self.assertTrue(tls.reload())
        self.assertIsNot(tls._context, before)
        connection = tls.serverConnectionForTLS(None)
        self.assertIs(connection.get_context(), tls._context)
