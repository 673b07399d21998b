"""Development PKI for the gRPC server: a CA, a server certificate, and client certificates
for optional mutual TLS, all with `cryptography` (no hand-made crypto).

Production deployments bring their own certificates; these are for running the whole
topology on a laptop or in CI with TLS on, as it should be.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from offsite.files import atomic_write

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
_VALID_DAYS = 825  # the longest validity mainstream TLS clients accept for a leaf


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Offsite (development)"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def generate_ca(common_name: str = "Offsite development CA") -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue_certificate(
    ca_key, ca_cert: x509.Certificate, common_name: str, hosts: tuple[str, ...] = (), client: bool = False
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A leaf certificate for a server (`hosts` as SANs) or, with `client`, for mutual TLS."""
    key = _key()
    now = dt.datetime.now(dt.timezone.utc)
    sans: list[x509.GeneralName] = []
    for host in hosts or (common_name,):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def key_pem(key) -> bytes:
    """A private key as unencrypted PKCS#8 PEM (written mode 600 by the callers)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_dev_pki(
    directory: str | Path,
    hosts: tuple[str, ...] = DEFAULT_HOSTS,
    client_name: str | None = "client",
    force: bool = False,
) -> dict[str, Path]:
    """Write ca.pem/ca.key, server.pem/server.key and (with `client_name`) client.pem/client.key.

    Private keys are mode 600. Existing files are kept unless `force`, so a second run never
    silently invalidates certificates already handed out.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {n: directory / f"{n.replace('_', '.')}" for n in ("ca_pem", "ca_key", "server_pem", "server_key")}
    if client_name:
        paths |= {"client_pem": directory / "client.pem", "client_key": directory / "client.key"}
    existing = [p for p in paths.values() if p.exists()]
    if existing and not force:
        raise FileExistsError(
            f"{', '.join(map(str, existing))} already exist; pass --force to replace them "
            "(certificates issued from the old CA stop working)"
        )
    ca_key, ca_cert = generate_ca()
    srv_key, srv_cert = issue_certificate(ca_key, ca_cert, hosts[0], hosts)
    atomic_write(paths["ca_key"], key_pem(ca_key), 0o600)
    atomic_write(paths["ca_pem"], cert_pem(ca_cert), 0o644)
    atomic_write(paths["server_key"], key_pem(srv_key), 0o600)
    atomic_write(paths["server_pem"], cert_pem(srv_cert), 0o644)
    if client_name:
        cl_key, cl_cert = issue_certificate(ca_key, ca_cert, client_name, (client_name,), client=True)
        atomic_write(paths["client_key"], key_pem(cl_key), 0o600)
        atomic_write(paths["client_pem"], cert_pem(cl_cert), 0o644)
    return paths


def server_credentials(cert_path: str | Path, key_path: str | Path, client_ca_path: str | Path | None = None):
    """gRPC server credentials; with `client_ca_path`, clients must present a certificate it signed."""
    import grpc

    cert, key = Path(cert_path).read_bytes(), Path(key_path).read_bytes()
    if client_ca_path is None:
        return grpc.ssl_server_credentials([(key, cert)])
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=Path(client_ca_path).read_bytes(), require_client_auth=True
    )
