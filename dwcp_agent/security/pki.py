"""Cluster PKI for the data and consensus channels: a cluster CA and one certificate per node.

Layout of a node's TLS directory (`tls_dir`, default `<state_dir>/tls`):
  ca.pem     trust bundle: every cluster CA certificate still trusted (two during a CA rotation)
  node.pem   this node's certificate (CN and SAN URI name the node_id), then its issuing CA
  node.key   its private key (0600)
The CA directory made by `pki init` holds ca.pem and ca.key. Files are replaced atomically
(write to a temporary name, fsync, rename), so an agent reading them mid-rotation sees either the
old or the new pair, never half of each; agents load them again for every new connection.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
NODE_CERT = "node.pem"
NODE_KEY = "node.key"
NODE_URI_PREFIX = "dwcp-node:"
CA_DAYS = 3650
NODE_DAYS = 365
RENEW_BEFORE = datetime.timedelta(days=30)


class PkiError(Exception):
    """A CA or node certificate is missing, unreadable or does not fit."""


@dataclass(frozen=True)
class NodeFiles:
    """Where one node's certificate, key and trust bundle live."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def in_dir(cls, tls_dir: Path, ca_file: Path | None = None) -> NodeFiles:
        return cls(tls_dir / NODE_CERT, tls_dir / NODE_KEY, ca_file or tls_dir / CA_CERT)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_certs(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise PkiError(f"cannot read certificates from {path}: {exc}") from exc


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise PkiError(f"cannot read the private key {path}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{path} is not an EC private key")
    return key


def init_ca(ca_dir: Path, name: str = "dwcp cluster CA", force: bool = False) -> Path:
    """Make a cluster CA (P-256, ten years) in `ca_dir`; an existing one is kept unless `force`."""
    if (ca_dir / CA_KEY).exists() and not force:
        raise PkiError(f"{ca_dir / CA_KEY} exists already (use rotate --ca to replace it)")
    key, cert = _new_ca(name)
    _write_atomic(ca_dir / CA_KEY, _key_pem(key), 0o600)
    _write_atomic(ca_dir / CA_CERT, _cert_pem(cert), 0o644)
    return ca_dir / CA_CERT


def ensure_ca(ca_dir: Path) -> Path:
    """The CA in `ca_dir`, made now if there is none (local demo clusters and tests); returns the dir."""
    if not (ca_dir / CA_KEY).exists():
        init_ca(ca_dir, "dwcp local cluster CA")
    return ca_dir


def _new_ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def issue_node(ca_dir: Path, node_id: str, out: NodeFiles, days: int = NODE_DAYS) -> x509.Certificate:
    """Issue a node certificate (client and server auth) naming `node_id`, signed by the CA in `ca_dir`.

    The trust bundle at `out.ca` gets every CA certificate of `ca_dir` it does not hold yet, so a
    node issued by a rotated CA still trusts peers of the old one until that is retired.
    """
    if not node_id or len(node_id) > 64 or not node_id.isprintable():
        raise PkiError(f"node id {node_id[:64]!r} must be 1-64 printable characters")
    ca_certs = load_certs(ca_dir / CA_CERT)
    ca_key = _load_key(ca_dir / CA_KEY)
    issuer = next((c for c in ca_certs if c.public_key() == ca_key.public_key()), None)
    if issuer is None:
        raise PkiError(f"{ca_dir / CA_KEY} does not belong to any certificate in {ca_dir / CA_CERT}")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
            .issuer_name(issuer.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(NODE_URI_PREFIX + node_id)]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    trust_cas(ca_dir, out.ca)
    # Key first: an agent that loads between the two renames sees the new key with the old
    # certificate, fails that one load and keeps the context it has (channels.py).
    _write_atomic(out.key, _key_pem(key), 0o600)
    _write_atomic(out.cert, _cert_pem(cert) + _cert_pem(issuer), 0o644)
    return cert


def trust_cas(ca_dir: Path, bundle: Path) -> int:
    """Add to `bundle` every CA certificate of `ca_dir` it lacks; returns how many were added."""
    ca_certs = load_certs(ca_dir / CA_CERT)
    held = load_certs(bundle) if bundle.exists() else []
    known = {c.fingerprint(hashes.SHA256()) for c in held}
    added = [c for c in ca_certs if c.fingerprint(hashes.SHA256()) not in known]
    if added or not bundle.exists():
        _write_atomic(bundle, b"".join(_cert_pem(c) for c in held + added), 0o644)
    return len(added)


def rotate_ca(ca_dir: Path, name: str = "dwcp cluster CA") -> None:
    """Start a CA rotation: a new CA key signs from now on; ca.pem holds new and old certificates.

    Then, in this order: add the new CA to every node's bundle (`pki trust`), re-issue every node
    (`pki rotate`), and once all run on new certificates drop the old CA (`pki retire`). Agents
    pick up each step for their next connection, so the cluster keeps running throughout.
    """
    old = load_certs(ca_dir / CA_CERT)
    key, cert = _new_ca(name)
    _write_atomic(ca_dir / CA_KEY, _key_pem(key), 0o600)
    _write_atomic(ca_dir / CA_CERT, _cert_pem(cert) + b"".join(_cert_pem(c) for c in old), 0o644)


def retire_old_cas(ca_dir: Path, bundle: Path) -> int:
    """Keep in `bundle` only the CA whose key is in `ca_dir`; returns how many were dropped."""
    current_key = _load_key(ca_dir / CA_KEY).public_key()
    certs = load_certs(bundle)
    keep = [c for c in certs if c.public_key() == current_key]
    if not keep:
        raise PkiError(f"{bundle} does not hold the current CA of {ca_dir}")
    _write_atomic(bundle, b"".join(_cert_pem(c) for c in keep), 0o644)
    return len(certs) - len(keep)


def node_identity(cert: x509.Certificate) -> str:
    """The node_id a certificate names (SAN URI dwcp-node:<id>, else its CN)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            if uri.startswith(NODE_URI_PREFIX):
                return uri[len(NODE_URI_PREFIX):]
    except x509.ExtensionNotFound:
        pass
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def needs_issue(files: NodeFiles, node_id: str) -> bool:
    """True when this node has no certificate, one for another name, or one expiring within 30 days."""
    if not files.cert.exists() or not files.key.exists():
        return True
    try:
        cert = load_certs(files.cert)[0]
    except (PkiError, IndexError):
        return True
    return node_identity(cert) != node_id or cert.not_valid_after_utc - _now() < RENEW_BEFORE
