"""Test certificates and SuperNode authentication keys for a local Flower deployment.

Everything here is for local testing only (a throw-away CA on 127.0.0.1), generated with
the ``cryptography`` package:

* :func:`generate_tls_certs` writes ``ca.crt``, ``server.pem`` and ``server.key``: a
  self-signed CA and a server certificate signed by it with SANs ``127.0.0.1``,
  ``localhost`` (and ``::1``). Flower 1.41 uses them as
  ``flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem
  --ssl-keyfile server.key``, ``flower-supernode --root-certificates ca.crt`` and
  ``root-certificates = "<abs path>/ca.crt"`` in the SuperLink connection of the
  Flower config.
* :func:`generate_supernode_keys` writes an EC key pair in OpenSSH format, which is what
  Flower 1.41 SuperNode authentication needs: the private key is passed with
  ``flower-supernode --auth-supernode-private-key <name>`` (must load with
  ``load_ssh_private_key`` and be an ``EllipticCurvePrivateKey``), the public key is
  registered with ``flwr supernode register <name>.pub <connection>`` (must load with
  ``load_ssh_public_key`` and use a NIST curve; Flower's docs use P-384).
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "AuthKeyPaths",
    "TlsPaths",
    "generate_supernode_keys",
    "generate_tls_certs",
]

DEFAULT_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class TlsPaths:
    """Paths of the generated TLS material."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class AuthKeyPaths:
    """Paths of one generated SuperNode authentication key pair (OpenSSH format)."""

    private_key: Path
    public_key: Path


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.TraditionalOpenSSL,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _san_entries(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def generate_tls_certs(
    out_dir: str | os.PathLike[str],
    hosts: Iterable[str] = DEFAULT_HOSTS,
    days: int = 30,
) -> TlsPaths:
    """Generate a test CA and a server certificate/key for ``hosts`` into ``out_dir``.

    Files: ``ca.crt``, ``ca.key``, ``server.pem``, ``server.key`` (all PEM; keys are EC
    P-256, unencrypted). Returns their paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hosts = list(hosts)
    now = _dt.datetime.now(_dt.timezone.utc)
    not_before = now - _dt.timedelta(minutes=5)
    not_after = now + _dt.timedelta(days=days)

    # --- CA ---------------------------------------------------------------------------
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedlrm test"),
            x509.NameAttribute(NameOID.COMMON_NAME, "fedlrm test CA"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    # --- server certificate -------------------------------------------------------------
    srv_key = ec.generate_private_key(ec.SECP256R1())
    srv_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedlrm test"),
            x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else "localhost"),
        ]
    )
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(srv_name)
        .issuer_name(ca_name)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(_san_entries(hosts)), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(srv_key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    return TlsPaths(
        ca_cert=_write(out / "ca.crt", ca_cert.public_bytes(pem)),
        ca_key=_write(out / "ca.key", _key_pem(ca_key), private=True),
        server_cert=_write(out / "server.pem", srv_cert.public_bytes(pem)),
        server_key=_write(out / "server.key", _key_pem(srv_key), private=True),
    )


def generate_supernode_keys(
    out_dir: str | os.PathLike[str],
    name: str = "supernode",
    curve: ec.EllipticCurve | None = None,
) -> AuthKeyPaths:
    """Generate a SuperNode auth key pair: ``<name>`` (OpenSSH private) + ``<name>.pub``.

    The default curve is NIST P-384 (SECP384R1), as in Flower's docs; any NIST curve is
    accepted by ``flwr supernode register``. ed25519 is *not* accepted for SuperNode auth
    (ed25519 keys are only used for ``--trusted-entities``, i.e. app signing).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(curve or ec.SECP384R1())
    priv = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.OpenSSH,
        encryption_algorithm=serialization.NoEncryption(),
    )
    pub = key.public_key().public_bytes(
        encoding=serialization.Encoding.OpenSSH,
        format=serialization.PublicFormat.OpenSSH,
    )
    return AuthKeyPaths(
        private_key=_write(out / name, priv, private=True),
        public_key=_write(out / f"{name}.pub", pub + f" {name}\n".encode()),
    )
