"""Throwaway certificates for tests, made at test time with ``cryptography``: a CA, a server certificate for
localhost / 127.0.0.1 / ::1, and client certificates (one signed by the CA, one by a stranger CA)."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _certificate(subject: str, key, issuer: str, issuer_key, ca: bool = False, server: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1"))]), critical=False)
    if not ca:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_certificates(folder: Path) -> Path:
    """Write ca.pem, server.pem/.key, client.pem/.key (signed by ca) and stranger.pem/.key (another CA)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, other_key = _key(), _key()
    (folder / "ca.pem").write_bytes(_pem_cert(_certificate("genserve-test-ca", ca_key, "genserve-test-ca",
                                                           ca_key, ca=True)))
    for name, issuer, issuer_key, server in (("server", "genserve-test-ca", ca_key, True),
                                             ("client", "genserve-test-ca", ca_key, False),
                                             ("stranger", "other-ca", other_key, False)):
        key = _key()
        (folder / f"{name}.key").write_bytes(_pem_key(key))
        (folder / f"{name}.pem").write_bytes(_pem_cert(_certificate(name, key, issuer, issuer_key,
                                                                    server=server)))
    return folder
