"""
A throw-away PKI for the TLS tests: a CA (and intermediate CAs under it),
server certificates (RSA and ECDSA), charger certificates (valid, expired,
revoked, from another CA), a CRL, all written as PEM files into a
directory.
"""

from __future__ import annotations

import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_NOW = datetime.datetime.now(datetime.timezone.utc)


def _name(cn: str, o: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if o:
        attributes.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, o))
    return x509.Name(attributes)


def _key(kind: str):
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class Issued:
    def __init__(self, certificate: x509.Certificate, key, certfile: str, keyfile: str):
        self.certificate = certificate
        self.key = key
        self.certfile = certfile
        self.keyfile = keyfile


class ThrowAwayPKI:
    """
    Certificates made on demand under C{directory}.
    """

    def __init__(self, directory: str, name: str = "Test CA",
                 parent: "ThrowAwayPKI | None" = None) -> None:
        """
        @param parent: the CA that signs this one (an intermediate CA), or
            C{None} for a self-signed root.
        """
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.ca_key = _key("ec")
        subject = _name(name, "ocppgw tests")
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(parent.ca.subject if parent else subject)
            .public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_NOW - datetime.timedelta(days=1))
            .not_valid_after(_NOW + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.ca_key.public_key()),
                critical=False,
            )
        )
        if parent is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(parent.ca_key.public_key()),
                critical=False,
            )
        self.ca = builder.sign(parent.ca_key if parent else self.ca_key, hashes.SHA256())
        self.cafile = self._write(f"ca-{id(self)}.pem", self._pem(self.ca))
        self.revoked: list[x509.Certificate] = []

    def intermediate(self, name: str = "Test Intermediate CA") -> "ThrowAwayPKI":
        """A CA this one signs, issuing certificates of its own."""
        return ThrowAwayPKI(self.directory, name, parent=self)

    @staticmethod
    def _pem(certificate) -> bytes:
        return certificate.public_bytes(serialization.Encoding.PEM)

    def _write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.directory, name)
        with open(path, "wb") as file:
            file.write(data)
        return path

    def issue(
        self,
        cn: str,
        *,
        o: str | None = None,
        server: bool = False,
        kind: str = "rsa",
        expired: bool = False,
        password: bytes | None = None,
        name: str | None = None,
    ) -> Issued:
        key = _key(kind)
        if expired:
            before = _NOW - datetime.timedelta(days=10)
            after = _NOW - datetime.timedelta(days=1)
        else:
            before = _NOW - datetime.timedelta(hours=1)
            after = _NOW + datetime.timedelta(days=10)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn, o))
            .issuer_name(self.ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(before)
            .not_valid_after(after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server
                     else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False
            )
        certificate = builder.sign(self.ca_key, hashes.SHA256())
        name = name or f"{cn}-{kind}-{certificate.serial_number:x}"
        encryption = (
            serialization.BestAvailableEncryption(password)
            if password
            else serialization.NoEncryption()
        )
        keyfile = self._write(
            f"{name}.key",
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
            ),
        )
        certfile = self._write(f"{name}.pem", self._pem(certificate))
        return Issued(certificate, key, certfile, keyfile)

    def revoke(self, issued: Issued) -> None:
        self.revoked.append(issued.certificate)

    def write_crl(self, name: str = "crl.pem") -> str:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.ca.subject)
            .last_update(_NOW - datetime.timedelta(hours=1))
            .next_update(_NOW + datetime.timedelta(days=7))
        )
        for certificate in self.revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(certificate.serial_number)
                .revocation_date(_NOW - datetime.timedelta(minutes=5))
                .build()
            )
        crl = builder.sign(self.ca_key, hashes.SHA256())
        return self._write(name, crl.public_bytes(serialization.Encoding.PEM))
