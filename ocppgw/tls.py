"""
TLS for the wss:// listener (OCPP security profiles 2 and 3).

What a charger meets:

- TLS 1.2 or 1.3 by default (C{ssl.min_version}); anything older ends in a
  handshake failure. OCPP 2.0.1 (part 2, A00.FR.318/319) requires the CSMS
  to offer TLS_ECDHE_ECDSA_WITH_AES_128/256_GCM and
  TLS_RSA_WITH_AES_128/256_GCM; those four are enabled by default
  (C{ssl.ciphers}), plus the ECDHE-RSA variants of the RSA ones (forward
  secrecy for chargers with an RSA certificate that can do ECDHE). The
  ECDSA suites need an ECDSA server certificate and the RSA ones an RSA
  certificate, so two certificates can be configured side by side
  (C{ssl.certfile} and C{ssl.alt_certfile}); OpenSSL picks the one that
  fits the suite the charger chose.
- Chargers whose TLS stack stops at TLS 1.0 or 1.1 (EVBox EV7) are served
  only when C{ssl.min_version} says so, with suites C{ssl.ciphers} names:
  OpenSSL 3 refuses those versions at its default security level (their
  handshakes sign with SHA-1/MD5), so the level is lowered to 0 for such a
  listener unless the cipher list sets one itself, and a warning at start
  names the risk.
- The whole chain in C{ssl.certfile} (server certificate, then the
  intermediates) is sent: chargers usually trust only a root and cannot
  fetch a missing intermediate.
- Profile 3: the charger's certificate must chain to the configured CA
  bundle, be within its validity period and, when a CRL file is given, not
  be revoked. OpenSSL checks all of that during the handshake; which
  charger the certificate belongs to is decided later, on the HTTP
  request, by L{CertificateIdentity}, because only then is the identity in
  the URL known.

L{ServerTLS} holds the current C{OpenSSL.SSL.Context} and builds one
C{SSL.Connection} per accepted socket from it. L{ServerTLS.reload} builds a
new context from the files and swaps it in: connections made before keep the
context they started with, new ones get the new material. A reload that
fails (a missing file, a key that does not match) keeps the old context and
says why, so a typo during a certificate rotation does not take the
listener down.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from ocppgw.config import TLS12_CIPHERS

_log = Logger()

#: OpenSSL names of the TLS 1.2 suites offered by default, strongest first.
#: The four OCPP 2.0.1 requires, plus ECDHE-RSA (see the module docstring).
CIPHERS_TLS12 = TLS12_CIPHERS

#: ssl.min_version -> OpenSSL's protocol version constant.
_MIN_VERSIONS = {
    "TLSv1": SSL.TLS1_VERSION,
    "TLSv1.1": SSL.TLS1_1_VERSION,
    "TLSv1.2": SSL.TLS1_2_VERSION,
    "TLSv1.3": SSL.TLS1_3_VERSION,
}
#: Versions OpenSSL 3 refuses at security level 1 and above.
_LEGACY_VERSIONS = frozenset({"TLSv1", "TLSv1.1"})


class TLSConfigError(Exception):
    """
    The certificate, key, CA bundle or CRL files cannot be used.
    """


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise TLSConfigError(f"{path}: cannot read: {error.strerror or error}") from None


def _password(path: str) -> Optional[bytes]:
    if not path:
        return None
    lines = _read(path).splitlines()
    return lines[0] if lines else b""


@dataclass(frozen=True)
class TLSFiles:
    """
    The files a TLS listener is built from (see the C{ssl.*} keys).
    """

    certfile: str
    keyfile: str
    password_file: str = ""
    alt_certfile: str = ""
    alt_keyfile: str = ""
    cacertfile: str = ""
    crlfile: str = ""
    verify_peer: bool = False
    fail_if_no_peer_cert: bool = True
    #: C{ssl.min_version}: the oldest TLS version accepted
    min_version: str = "TLSv1.2"
    #: C{ssl.ciphers}: the OpenSSL cipher list for TLS 1.2 and older
    ciphers: str = ":".join(TLS12_CIPHERS)

    @property
    def legacy(self) -> bool:
        """Whether TLS 1.0 or 1.1 is accepted."""
        return self.min_version in _LEGACY_VERSIONS

    @classmethod
    def from_listener(cls, listener) -> "TLSFiles":
        verify = listener.ssl_verify or (
            "verify_peer" if listener.ssl_profile == 3 else "verify_none"
        )
        return cls(
            certfile=listener.ssl_certfile,
            keyfile=listener.ssl_keyfile,
            password_file=listener.ssl_password_file,
            alt_certfile=listener.ssl_alt_certfile,
            alt_keyfile=listener.ssl_alt_keyfile,
            cacertfile=listener.ssl_cacertfile,
            crlfile=listener.ssl_crlfile,
            verify_peer=verify == "verify_peer",
            fail_if_no_peer_cert=listener.ssl_fail_if_no_peer_cert,
            min_version=listener.ssl_min_version,
            ciphers=listener.ssl_ciphers,
        )


def _accept_verified(connection, certificate, error_number, depth, ok) -> bool:
    # OpenSSL has verified the chain (CA, validity, CRL); its verdict
    # stands. A callback is still needed: pyOpenSSL wants one.
    return bool(ok)


def build_context(files: TLSFiles) -> SSL.Context:
    """
    A server context from C{files}.

    @raise TLSConfigError: naming the file that cannot be used.
    """
    password = _password(files.password_file)
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(_MIN_VERSIONS[files.min_version])
    context.set_options(
        SSL.OP_NO_COMPRESSION
        | SSL.OP_CIPHER_SERVER_PREFERENCE
        | getattr(SSL, "OP_NO_RENEGOTIATION", 0)
    )
    ciphers = files.ciphers
    if files.legacy and "@SECLEVEL" not in ciphers.upper():
        # OpenSSL 3 accepts TLS 1.0/1.1 and SHA-1 handshake signatures
        # only at security level 0.
        ciphers += ":@SECLEVEL=0"
    try:
        context.set_cipher_list(ciphers.encode("ascii"))
    except SSL.Error:
        raise TLSConfigError(f"ssl.ciphers: OpenSSL knows no suite in {ciphers}") from None
    # OpenSSL keeps a read and a write buffer (~34 KB) per connection for
    # its whole life; an idle charger needs neither between its messages.
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    if password is not None:
        context.set_passwd_cb(lambda *_args: password)
    _load_certificates(context, files)
    if files.verify_peer:
        _verify_clients(context, files)
    # Each context gets its own session id context: sessions are not
    # resumed across a reload into material they were not verified with.
    context.set_session_id(hashlib.sha256(repr(files).encode()).digest()[:32])
    return context


def _load_certificates(context: SSL.Context, files: TLSFiles) -> None:
    """The server's certificate chains and keys (the main one, and the alternative)."""
    pairs = [(files.certfile, files.keyfile)]
    if files.alt_certfile:
        pairs.append((files.alt_certfile, files.alt_keyfile))
    for certfile, keyfile in pairs:
        try:
            context.use_certificate_chain_file(certfile)
        except SSL.Error:
            raise TLSConfigError(f"{certfile}: not a PEM certificate chain") from None
        try:
            context.use_privatekey_file(keyfile)
        except SSL.Error as error:
            if "mismatch" in str(error).lower():
                raise TLSConfigError(f"{keyfile}: does not match {certfile}") from None
            raise TLSConfigError(
                f"{keyfile}: not a PEM private key, or a wrong password in ssl.password_file"
            ) from None
        try:
            context.check_privatekey()
        except SSL.Error:
            raise TLSConfigError(f"{keyfile}: does not match {certfile}") from None


def _verify_clients(context: SSL.Context, files: TLSFiles) -> None:
    """Client certificates: the CA bundle that issues them, and the CRL."""
    mode = SSL.VERIFY_PEER
    if files.fail_if_no_peer_cert:
        mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    context.set_verify(mode, _accept_verified)
    try:
        context.load_verify_locations(files.cacertfile)
    except SSL.Error:
        raise TLSConfigError(f"{files.cacertfile}: not a PEM CA bundle") from None
    # Tell clients which CAs we accept, so a charger holding several
    # certificates picks the right one.
    try:
        cas = x509.load_pem_x509_certificates(_read(files.cacertfile))
    except ValueError:
        raise TLSConfigError(f"{files.cacertfile}: not a PEM CA bundle") from None
    from OpenSSL.crypto import X509

    context.set_client_ca_list(
        [X509.from_cryptography(ca).get_subject() for ca in cas]
    )
    if files.crlfile:
        store = context.get_cert_store()
        data = _read(files.crlfile)
        crls = _load_crls(files.crlfile, data)
        for crl in crls:
            store.add_crl(crl)
        from OpenSSL.crypto import X509StoreFlags

        store.set_flags(X509StoreFlags.CRL_CHECK)


def _load_crls(path: str, data: bytes) -> list:
    marker = b"-----BEGIN X509 CRL-----"
    blocks = [marker + block for block in data.split(marker)[1:]]
    crls = []
    try:
        if blocks:
            crls = [x509.load_pem_x509_crl(block) for block in blocks]
        else:
            crls = [x509.load_der_x509_crl(data)]
    except ValueError:
        raise TLSConfigError(f"{path}: not a PEM or DER certificate revocation list") from None
    return crls


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    The TLS side of one listener, reloadable.

    Given to C{TLSMemoryBIOFactory}: every accepted connection gets an
    C{SSL.Connection} on the context current at that moment.
    """

    def __init__(self, files: TLSFiles) -> None:
        self.files = files
        self._context = build_context(files)
        if files.legacy:
            _log.warn(
                "ssl.min_version = {version}: chargers may connect with TLS 1.0/1.1 and the "
                "suites of ssl.ciphers ({ciphers}). These versions are broken (BEAST, "
                "SHA-1/MD5 handshake signatures, no AEAD suites): an attacker on the "
                "charger's network may read or alter its traffic, Basic auth passwords "
                "included. Keep such chargers on a network of their own, and raise "
                "ssl.min_version once their firmware can do TLS 1.2.",
                version=files.min_version,
                ciphers=files.ciphers,
            )

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        return SSL.Connection(self._context, None)

    def reload(self) -> bool:
        """
        Re-read the files; on failure keep the current material.

        @return: whether the new material is in use.
        """
        try:
            context = build_context(self.files)
        except TLSConfigError as error:
            _log.error("TLS reload failed, keeping the old certificates: {error}",
                       error=str(error))
            return False
        self._context = context
        _log.info("TLS certificates, CA bundle and CRL reloaded")
        return True


def failure_reason(error: SSL.Error) -> str:
    """
    OpenSSL's reason for a failed TLS connection, in its own words
    (C{no shared cipher}, C{certificate verify failed}, C{tlsv1 alert
    unknown ca}, ...): the reason strings of the errors it queued.
    """
    queued = error.args[0] if error.args else None
    if isinstance(queued, list):
        reasons = [
            entry[2] for entry in queued
            if isinstance(entry, tuple) and len(entry) == 3 and entry[2]
        ]
        if reasons:
            return "; ".join(dict.fromkeys(reasons))[:200]
    return (str(error) or type(error).__name__)[:200]


def fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 fingerprint as lower-case hex without separators."""
    from cryptography.hazmat.primitives import hashes

    return certificate.fingerprint(hashes.SHA256()).hex()


def _subject(certificate: x509.Certificate, oid) -> Optional[str]:
    values = certificate.subject.get_attributes_for_oid(oid)
    # Exactly one: a certificate with two CNs names no single charger.
    if len(values) != 1:
        return None
    value = values[0].value
    return value if isinstance(value, str) else None


class CertificateIdentity:
    """
    Which charger a (verified) client certificate belongs to.

    Rules (C{ssl.identity}):

    - C{cn}: the subject CN is the identity;
    - C{cn_and_o}: the subject CN is the identity and the subject O must be
      the configured organisation (OCPP 2.0.1 A00.FR.413 puts the CSO name
      there), so that a certificate the same CA issued to another operator's
      station is refused;
    - C{map}: a file maps SHA-256 fingerprints (hex, C{:} optional) or
      C{serial:<hex>} to identities, for certificates whose subject does
      not name the charger. Re-read on L{reload}.
    """

    def __init__(self, rule: str = "cn", organization: str = "", map_file: str = "") -> None:
        self.rule = rule
        self.organization = organization
        self.map_file = map_file
        self._map: dict[str, str] = {}
        if rule == "map":
            self._map = self._read_map()

    def _read_map(self) -> dict[str, str]:
        mapping = {}
        for number, raw in enumerate(_read(self.map_file).decode("utf-8").splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            key, _, identity = line.partition(" ")
            identity = identity.strip()
            if not identity:
                raise TLSConfigError(f"{self.map_file}:{number}: expected '<key> <identity>'")
            try:
                mapping[_map_key(key)] = identity
            except ValueError:
                raise TLSConfigError(
                    f"{self.map_file}:{number}: not a fingerprint or serial:<hex>"
                ) from None
        return mapping

    def reload(self) -> bool:
        if self.rule != "map":
            return True
        try:
            self._map = self._read_map()
        except (TLSConfigError, UnicodeDecodeError) as error:
            _log.error("Identity map reload failed, keeping the old one: {error}",
                       error=str(error))
            return False
        return True

    def identity_of(self, certificate: x509.Certificate) -> Optional[str]:
        """The charger identity the certificate names, or C{None}."""
        if self.rule == "map":
            return self._map.get(fingerprint(certificate)) or self._map.get(
                f"serial:{certificate.serial_number:x}"
            )
        cn = _subject(certificate, NameOID.COMMON_NAME)
        if self.rule == "cn_and_o" and _subject(
            certificate, NameOID.ORGANIZATION_NAME
        ) != self.organization:
            return None
        return cn


def _map_key(key: str) -> str:
    key = key.strip().lower()
    if key.startswith("serial:"):
        return "serial:" + format(int(key[7:].replace(":", ""), 16), "x")
    return key.replace(":", "")
