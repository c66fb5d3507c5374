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
