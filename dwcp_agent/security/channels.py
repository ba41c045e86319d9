"""TLS 1.3 with mutual certificates on the data and consensus ports (or explicit plaintext).

Every connection between agents is wrapped before the first DWCP or ACP byte: both sides present
a node certificate issued by the cluster CA (security/pki.py) and verify the other's. The name
in the peer's certificate is the peer's identity; the DWCP and ACP handshakes then refuse a peer
whose claimed node_id differs from it, so a relay that terminates connections has no certificate
to offer, a reflected connection names the wrong node, and a byte-forwarding relay sees only
ciphertext. Every record carries an AES-GCM tag, so chunk integrity on the wire is keyed.

Certificates are read again whenever their files change, for the next connection: rotation
needs no restart and leaves established connections alone.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dwcp_agent.config import Config, ConfigError
from dwcp_agent.security import pki

log = logging.getLogger("dwcp_agent.security")

# OpenSSL 3 SSL_OP_ENABLE_KTLS (Python 3.12 names it ssl.OP_ENABLE_KTLS): the kernel does the
# record encryption when the `tls` TCP ULP is available, otherwise OpenSSL does, unchanged.
OP_ENABLE_KTLS = getattr(ssl, "OP_ENABLE_KTLS", 1 << 3)
MODE_TLS = "tls1.3-mutual"
MODE_PLAINTEXT = "plaintext"


class PeerIdentityError(ssl.SSLError):
    """The peer's certificate does not name a node (or not the node we dialled)."""


@dataclass(frozen=True)
class _Loaded:
    stamp: tuple[tuple[int, int], ...]
    server: ssl.SSLContext
    client: ssl.SSLContext
    not_after: str


def _stamp(files: pki.NodeFiles) -> tuple[tuple[int, int], ...]:
    out = []
    for path in (files.cert, files.key, files.ca):
        try:
            st = path.stat()
            out.append((st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((0, 0))
    return tuple(out)


def _context(purpose: int, files: pki.NodeFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(files.cert), str(files.key))
    ctx.load_verify_locations(cafile=str(files.ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = False  # identity is the node name in the certificate, checked by the caller
    ctx.options |= OP_ENABLE_KTLS | ssl.OP_NO_TICKET
    if purpose == ssl.PROTOCOL_TLS_SERVER:
        ctx.num_tickets = 0  # no resumption: every connection shows a certificate checked now
    return ctx


def identity_from_peercert(cert: dict[str, Any] | None) -> str:
    """Node name of a verified peer certificate, as ssl's getpeercert() returns it ('' if none)."""
    if not cert:
        return ""
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "URI" and value.startswith(pki.NODE_URI_PREFIX):
            return str(value[len(pki.NODE_URI_PREFIX):])
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


class ChannelSecurity:
    """TLS contexts for one node, reloaded when its certificate files change; or plaintext."""

    def __init__(self, node_id: str, files: pki.NodeFiles | None) -> None:
        self.node_id = node_id
        self.files = files
        self._lock = threading.Lock()
        self._loaded: _Loaded | None = None
        self.reload_errors = 0
        if files is not None:
            self._current()  # a bad certificate stops start-up, with its reason

    @property
    def encrypted(self) -> bool:
        return self.files is not None

    def _current(self) -> _Loaded:
        assert self.files is not None
        stamp = _stamp(self.files)
        with self._lock:
            loaded = self._loaded
            if loaded is not None and loaded.stamp == stamp:
                return loaded
            try:
                server = _context(ssl.PROTOCOL_TLS_SERVER, self.files)
                client = _context(ssl.PROTOCOL_TLS_CLIENT, self.files)
                not_after = pki.load_certs(self.files.cert)[0].not_valid_after_utc.isoformat()
            except (OSError, ssl.SSLError, pki.PkiError, IndexError) as exc:
                if loaded is None:
                    raise ConfigError("tls_dir", f"cannot load the node certificate {self.files.cert}: {exc}") from exc
                self.reload_errors += 1  # mid-rotation (key renamed before the cert): keep the last good pair
                log.warning("keeping the current TLS certificate: reload failed: %s", exc)
                return loaded
            server.sni_callback = self._switch_to_current
            self._loaded = _Loaded(stamp, server, client, not_after)
            if loaded is not None:
                log.info("TLS certificate reloaded from %s (valid until %s)", self.files.cert, not_after)
            return self._loaded

    def _switch_to_current(self, conn: ssl.SSLObject | ssl.SSLSocket, _name: str | None,
                           ctx: ssl.SSLContext) -> None:
        """During each server handshake: use the newest certificate, so a listener built once
        (the ACP port's asyncio server) serves a rotated certificate without a restart."""
        current = self._current().server
        if current is not ctx:
            conn.context = current

    def server_context(self) -> ssl.SSLContext | None:
        return self._current().server if self.files is not None else None

    def client_context(self) -> ssl.SSLContext | None:
        return self._current().client if self.files is not None else None

    def wrap_server(self, sock: socket.socket) -> socket.socket:
        """TLS-accept on a connected socket (the caller bounds the time); plaintext: as is."""
        ctx = self.server_context()
        if ctx is None:
            return sock
        tls = ctx.wrap_socket(sock, server_side=True)
        _require_identity(tls)
        return tls

    def wrap_client(self, sock: socket.socket, expect_peer: str = "") -> socket.socket:
        """TLS-connect; with `expect_peer`, the server's certificate must name that node."""
        ctx = self.client_context()
        if ctx is None:
            return sock
        tls = ctx.wrap_socket(sock, server_side=False)
        name = _require_identity(tls)
        if expect_peer and name != expect_peer:
            tls.close()
            raise PeerIdentityError(f"peer certificate names {name[:64]!r}, expected {expect_peer[:64]!r}")
        return tls

    def health(self) -> dict[str, Any]:
        if self.files is None:
            return {"channel_encryption": MODE_PLAINTEXT, "insecure_datacenter_plaintext": True}
        loaded = self._current()
        return {"channel_encryption": MODE_TLS, "insecure_datacenter_plaintext": False,
                "node_cert_not_after": loaded.not_after, "cert_reload_errors": self.reload_errors}


def peer_identity(sock: socket.socket) -> str:
    """Node name proven by a TLS peer's certificate; '' on a plaintext socket."""
    if isinstance(sock, ssl.SSLSocket):
        return identity_from_peercert(sock.getpeercert())
    return ""


def _require_identity(tls: ssl.SSLSocket) -> str:
    name = identity_from_peercert(tls.getpeercert())
    if not name:
        tls.close()
        raise PeerIdentityError("peer certificate names no node")
    return name


def node_files(config: Config) -> pki.NodeFiles:
    tls_dir = Path(config.tls_dir) if config.tls_dir else Path(config.state_dir) / "tls"
    return pki.NodeFiles.in_dir(tls_dir, Path(config.tls_ca_file) if config.tls_ca_file else None)


def from_config(config: Config) -> ChannelSecurity:
    """Channel security of an agent: its node certificate (issued now from `tls_auto_issue_ca_dir`
    when that is set and the certificate is missing or expiring), or plaintext when the explicit
    switch `insecure_datacenter_plaintext` is on."""
    if config.insecure_datacenter_plaintext:
        log.warning("insecure_datacenter_plaintext is on: data and consensus traffic is NOT encrypted and "
                    "peers are identified by the pre-shared key only; use this on a trusted network only")
        return ChannelSecurity(config.node_id, None)
    files = node_files(config)
    if config.tls_auto_issue_ca_dir and pki.needs_issue(files, config.node_id):
        try:
            pki.issue_node(Path(config.tls_auto_issue_ca_dir), config.node_id, files)
        except (pki.PkiError, OSError) as exc:
            raise ConfigError("tls_auto_issue_ca_dir", str(exc)) from exc
        log.info("issued a node certificate for %s from %s", config.node_id, config.tls_auto_issue_ca_dir)
    if not files.cert.exists() or not files.key.exists() or not files.ca.exists():
        raise ConfigError("tls_dir", f"no node certificate at {files.cert} (key {files.key}, CA bundle {files.ca}): "
                                     "make one with `dwcp-agent pki init` and `dwcp-agent pki issue`, or set "
                                     "tls_auto_issue_ca_dir; only on a trusted network, insecure_datacenter_plaintext")
    return ChannelSecurity(config.node_id, files)


_cache: dict[tuple[str, bool, str, str, str, str], ChannelSecurity] = {}
_cache_lock = threading.Lock()


def for_config(config: Config) -> ChannelSecurity:
    """One ChannelSecurity per distinct configuration, shared by the listener and every sender."""
    key = (config.node_id, config.insecure_datacenter_plaintext, config.tls_dir, config.tls_ca_file,
           config.tls_auto_issue_ca_dir, config.state_dir)
    with _cache_lock:
        found = _cache.get(key)
        if found is None:
            found = _cache[key] = from_config(config)
        return found
