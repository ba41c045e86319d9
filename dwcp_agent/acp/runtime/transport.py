"""Authenticated ACP links between agents (default port 9877): PSK handshake, then MAC'd frames.

Handshake (the dialer speaks first), all msgspec structs over msgpack, length-prefixed:
  dialer -> Hello(node, nonce_a, public_key); listener -> Hello(node, nonce_b, public_key, proof_b, sig_b);
  dialer -> Proof(proof_a, sig_a); proofs are HMAC(PSK, role | nonces | ids | keys), signatures are
  Ed25519 over the same transcript by the node's signing key.
Identity: a name is accepted only with the public key pinned for it (configuration or registry,
see `auth.KeyRing`) and a signature proving its possession; the handshake never pins or changes
a key. A failed handshake is counted against the source address, never the name it claimed, and
an address with too many recent failures is refused at accept for a while.
Neither side changes any state before the other has proven the key. Afterwards every frame is
`length | body | HMAC(session_key, counter | body)[:16]` with a per-direction counter, so frames
cannot be altered, reordered or replayed on the link. Each agent dials every peer once to send and
accepts connections to receive; a lost link is redialled with backoff and queued frames are kept
up to a bound (consensus tolerates the loss of anything beyond it).

With a ChannelSecurity (security/channels.py) every link is TLS 1.3 with mutual certificates and
the Hello's node must be the name in the peer's certificate. Before the proof, frames are at most
MAX_HANDSHAKE_FRAME bytes, the whole handshake has one deadline, and inbound connections are capped
in total and per source address.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import struct
import time
from collections.abc import Callable

import msgspec

from dwcp_agent.acp.auth import KeyRing
from dwcp_agent.acp.messages import Envelope, decode_envelope, encode
from dwcp_agent.security.channels import ChannelSecurity, identity_from_peercert
from dwcp_agent.security.preauth import ConnectionLimiter

__all__ = ["HandshakeFailures", "Transport", "parse_addr"]

log = logging.getLogger("dwcp_agent.acp.transport")
_LEN = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024
MAX_HANDSHAKE_FRAME = 4 * 1024  # Hello and Proof are a few hundred bytes
MAX_INBOUND = 256
MAX_INBOUND_PER_SOURCE = 32
QUEUE_LIMIT = 10000
STOP_TIMEOUT_S = 5.0  # stop() gives up on a task that still runs after this
VERSION = 1


class _Hello(msgspec.Struct, array_like=True):
    version: int
    node: str
    nonce: bytes
    public_key: bytes
    proof: bytes = b""
    sig: bytes = b""


class _Proof(msgspec.Struct, array_like=True):
    proof: bytes
    sig: bytes = b""


class HandshakeFailures:
    """Failed handshakes per source address: at most `limit` in `window_s`, then refused until the
    window ends. Bounded in addresses, so a scan from many sources cannot grow it without end."""

    def __init__(self, limit: int = 10, window_s: float = 60.0, max_addrs: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window_s, self.max_addrs, self.clock = limit, window_s, max_addrs, clock
        self._seen: dict[str, tuple[float, int]] = {}

    def record(self, addr: str) -> int:
        """Count one failure from `addr`; returns its count in the current window."""
        now = self.clock()
        start, count = self._seen.get(addr, (now, 0))
        if now - start >= self.window_s:
            start, count = now, 0
        if addr not in self._seen and len(self._seen) >= self.max_addrs:
            oldest = min(self._seen, key=lambda a: self._seen[a][0])
            del self._seen[oldest]
        self._seen[addr] = (start, count + 1)
        return count + 1

    def blocked(self, addr: str) -> bool:
        """True while `addr` is over the limit in its window."""
        entry = self._seen.get(addr)
        if entry is None:
            return False
        start, count = entry
        if self.clock() - start >= self.window_s:
            del self._seen[addr]
            return False
        return count >= self.limit


def parse_addr(addr: str) -> tuple[str, int]:
    """'host:port' -> (host, port)."""
    host, _, port = addr.rpartition(":")
    return host or "127.0.0.1", int(port)


async def _read_frame(reader: asyncio.StreamReader, limit: int = MAX_FRAME) -> bytes:
    (length,) = _LEN.unpack(await reader.readexactly(4))
    if length > limit:
        raise ConnectionError(f"frame of {length} bytes exceeds the limit")
    return await reader.readexactly(length)


def _transcript(role: bytes, a: _Hello, b: _Hello) -> bytes:
    return role + a.nonce + b.nonce + a.node.encode() + b"\0" + b.node.encode() + a.public_key + b.public_key


def _proof(psk: bytes, role: bytes, a: _Hello, b: _Hello) -> bytes:
    return hmac.digest(psk, _transcript(role, a, b), "sha256")


def _source(writer: asyncio.StreamWriter) -> str:
    peername = writer.get_extra_info("peername")
    return str(peername[0]) if isinstance(peername, tuple) and peername else "?"


class _Session:
    """Per-connection MAC state for one direction."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.counter = 0

    def seal(self, body: bytes) -> bytes:
        self.counter += 1
        tag = hmac.digest(self.key, self.counter.to_bytes(8, "big") + body, "sha256")[:16]
        return _LEN.pack(len(body) + 16) + body + tag

    def open(self, frame: bytes) -> bytes:
        body, tag = frame[:-16], frame[-16:]
        self.counter += 1
        if not hmac.compare_digest(hmac.digest(self.key, self.counter.to_bytes(8, "big") + body, "sha256")[:16], tag):
            raise ConnectionError("frame authenticator mismatch")
        return body


class Transport:
    """Sends envelopes to peers by id and hands received ones to `on_envelope(peer, env)`."""

    def __init__(self, node_id: str, psk: bytes, keys: KeyRing, on_envelope: Callable[[str, Envelope], None],
                 on_refused: Callable[[str, str], None] | None = None, connect_timeout: float = 2.0,
                 failures: HandshakeFailures | None = None, channels: ChannelSecurity | None = None) -> None:
        if not psk:
            raise ValueError("ACP needs a pre-shared key (config psk or psk_file) for a multi-node cluster")
        self.id = node_id
        self.psk = psk
        self.keys = keys
        self.on_envelope = on_envelope
        self.on_refused = on_refused or (lambda addr, reason: None)
        self.failures = failures or HandshakeFailures()
        self.connect_timeout = connect_timeout
        self.channels = channels
        self.inbound_limit = ConnectionLimiter(MAX_INBOUND, MAX_INBOUND_PER_SOURCE)
        self.addrs: dict[str, str] = {}
        self._queues: dict[str, asyncio.Queue[bytes]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._server: asyncio.Server | None = None
        self._inbound: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.port = 0
        self.frames_sent = 0
        self.frames_dropped = 0

    async def start(self, host: str, port: int) -> None:
        """Listen for peers."""
        ssl_ctx = self.channels.server_context() if self.channels else None
        # Fixed per listener, but it switches each handshake to the current certificate (channels.py).
        self._server = await asyncio.start_server(self._accept, host, port, ssl=ssl_ctx,
                                                  ssl_handshake_timeout=self.connect_timeout if ssl_ctx else None)
        self.port = self._server.sockets[0].getsockname()[1]

    def set_peers(self, addrs: dict[str, str]) -> None:
        """Peer id -> 'host:port'; new peers get a sender task."""
        for peer, addr in addrs.items():
            if peer != self.id:
                self.addrs[peer] = addr

    def send(self, env: Envelope) -> None:
        """Queue an envelope; never blocks (drops beyond the queue bound)."""
        peer = env.to
        if peer not in self.addrs:
            return
        queue = self._queues.get(peer)
        if queue is None:
            queue = self._queues[peer] = asyncio.Queue()
            self._tasks[peer] = asyncio.get_running_loop().create_task(self._sender(peer, queue))
        if queue.qsize() >= QUEUE_LIMIT:
            self.frames_dropped += 1
            return
        queue.put_nowait(encode(env))

    async def stop(self) -> None:
        """Close the listener, the senders and inbound connections.

        Bounded: on Python 3.11 `asyncio.wait_for` can swallow a cancellation that lands as its
        inner call completes (gh-86296), so a task may outlive one cancel; `_stopping` ends the
        sender's loop, and each task is cancelled again until it is gone or the bound passes."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
        deadline = asyncio.get_running_loop().time() + STOP_TIMEOUT_S
        while tasks := [t for t in (*self._tasks.values(), *self._inbound) if not t.done()]:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=min(left, 0.5))
        for task in (*self._tasks.values(), *self._inbound):
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: a connection's end is not worth a warning at shutdown
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    # ------------------------------------------------------------ handshake
    def _hello(self, nonce: bytes) -> _Hello:
        return _Hello(VERSION, self.id, nonce, self.keys.public_key)

    def _sign(self, role: bytes, a: _Hello, b: _Hello) -> bytes:
        return self.keys.sign(b"acp-handshake|" + _transcript(role, a, b))

    def _identity_ok(self, hello: _Hello, role: bytes, a: _Hello, b: _Hello, sig: bytes) -> bool:
        """The peer's name has a pinned key, it presented that key, and signed the transcript with it."""
        pinned = self.keys.pinned(hello.node)
        return (pinned is not None and hello.node != self.id and hmac.compare_digest(pinned, hello.public_key)
                and self.keys.verify(hello.node, b"acp-handshake|" + _transcript(role, a, b), sig))

    def _failed(self, addr: str, reason: str) -> None:
        """Blame the source address (the only thing an unauthenticated peer cannot choose)."""
        self.failures.record(addr)
        self.on_refused(addr, reason)

    async def _dial(self, peer: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, _Session]:
        host, port = parse_addr(self.addrs[peer])
        ssl_ctx = self.channels.client_context() if self.channels else None
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ssl_ctx, server_hostname=host if ssl_ctx else None),
            self.connect_timeout)
        try:
            if ssl_ctx is not None and identity_from_peercert(writer.get_extra_info("peercert")) != peer:
                raise ConnectionError(f"peer at {self.addrs[peer]} has no certificate for {peer!r}")
            mine = self._hello(os.urandom(16))
            writer.write(_LEN.pack(len(body := encode(mine))) + body)
            theirs = msgspec.msgpack.decode(
                await asyncio.wait_for(_read_frame(reader, MAX_HANDSHAKE_FRAME), self.connect_timeout), type=_Hello)
            bare = _Hello(theirs.version, theirs.node, theirs.nonce, theirs.public_key)
            if theirs.version != VERSION or theirs.node != peer:
                raise ConnectionError(f"peer at {self.addrs[peer]} is {theirs.node[:64]!r} v{theirs.version}")
            # Counted, not rate-limited: the accept-side limit is for sources that connect to us.
            if not hmac.compare_digest(theirs.proof, _proof(self.psk, b"listener", mine, bare)):
                self.on_refused(host, "invalid_mac")
                raise ConnectionError("peer failed the pre-shared key proof")
            if not self._identity_ok(bare, b"listener", mine, bare, theirs.sig):
                self.on_refused(host, "identity")
                raise ConnectionError(f"peer at {self.addrs[peer]} did not prove the key pinned for {peer!r}")
            body = encode(_Proof(_proof(self.psk, b"dialer", mine, bare), self._sign(b"dialer", mine, bare)))
            writer.write(_LEN.pack(len(body)) + body)
            await writer.drain()
            key = hmac.digest(self.psk, b"session" + mine.nonce + bare.nonce, "sha256")
            return reader, writer, _Session(key)
        except BaseException:
            writer.close()
            raise

    async def _sender(self, peer: str, queue: asyncio.Queue[bytes]) -> None:
        backoff = 0.05
        pending: bytes | None = None
        while not self._stopping:
            try:
                _reader, writer, session = await self._dial(peer)
            except (TimeoutError, OSError, ConnectionError, msgspec.DecodeError, msgspec.ValidationError,
                    asyncio.IncompleteReadError):
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.05
            try:
                while True:
                    if pending is None:
                        pending = await queue.get()
                    chunks = [session.seal(pending)]
                    pending = None
                    while not queue.empty() and len(chunks) < 256:
                        chunks.append(session.seal(queue.get_nowait()))
                    writer.writelines(chunks)
                    self.frames_sent += len(chunks)
                    await writer.drain()
            except (OSError, ConnectionError):
                pass
            finally:
                writer.close()

    async def _handshake_in(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            addr: str) -> tuple[_Hello, bytes] | None:
        """The listener's side: (the dialer's Hello, our nonce) once it proved key and identity, else None."""
        theirs = msgspec.msgpack.decode(await _read_frame(reader, MAX_HANDSHAKE_FRAME), type=_Hello)
        if theirs.version != VERSION:
            raise ConnectionError(f"unsupported ACP version {theirs.version}")
        if self.channels is not None and self.channels.encrypted:
            certified = identity_from_peercert(writer.get_extra_info("peercert"))
            if certified != theirs.node:
                raise ConnectionError(f"hello names {theirs.node[:64]!r}, certificate {certified[:64]!r}")
        mine = self._hello(os.urandom(16))
        bare = self._hello(mine.nonce)
        mine.proof = _proof(self.psk, b"listener", theirs, bare)
        mine.sig = self._sign(b"listener", theirs, bare)
        body = encode(mine)
        writer.write(_LEN.pack(len(body)) + body)
        await writer.drain()
        proof = msgspec.msgpack.decode(await _read_frame(reader, MAX_HANDSHAKE_FRAME), type=_Proof)
        if not hmac.compare_digest(proof.proof, _proof(self.psk, b"dialer", theirs, bare)):
            self._failed(addr, "invalid_mac")
            return None
        if not self._identity_ok(theirs, b"dialer", theirs, bare, proof.sig):
            self._failed(addr, "identity")
            return None
        return theirs, mine.nonce

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        addr = _source(writer)
        if self.inbound_limit.acquire(addr):
            self.on_refused(addr, "too_many_connections")
            writer.close()
            return
        if task is not None:
            self._inbound.add(task)
        authenticated = False
        try:
            if self.failures.blocked(addr):
                return
            # One deadline over the whole handshake: a peer trickling bytes cannot hold the slot.
            proven = await asyncio.wait_for(self._handshake_in(reader, writer, addr), self.connect_timeout)
            if proven is None:
                return
            theirs, my_nonce = proven
            peer = theirs.node
            authenticated = True
            session = _Session(hmac.digest(self.psk, b"session" + theirs.nonce + my_nonce, "sha256"))
            while True:
                body = session.open(await _read_frame(reader))
                try:
                    env = decode_envelope(body)
                except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, ValueError):
                    self.on_refused(addr, "malformed")  # counted and logged; not evidence against anyone
                    continue
                if env.frm != peer:
                    self.on_refused(addr, "malformed")
                    continue
                self.on_envelope(peer, env)
        except (TimeoutError, OSError, ConnectionError, asyncio.IncompleteReadError, msgspec.DecodeError,
                msgspec.ValidationError) as exc:
            if authenticated:
                pass
            elif isinstance(exc, (msgspec.DecodeError, msgspec.ValidationError)) or type(exc) is ConnectionError:
                self._failed(addr, "bad_handshake")  # garbage or a wrong version: someone is probing
            else:
                self.on_refused(addr, "incomplete")  # a peer that went away mid-handshake: no limit
        finally:
            writer.close()
            self.inbound_limit.release(addr)
            if task is not None:
                self._inbound.discard(task)
