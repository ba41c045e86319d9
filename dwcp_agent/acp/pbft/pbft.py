"""PBFT (Castro & Liskov) as a pure state machine: n = 3f+1 replicas tolerate f Byzantine ones.

Same contract as `raft.Raft`: the caller drives `tick()`, `receive(sender, wire)` and
`submit(request)`, takes `ready()` (messages to send, batches committed in sequence order, a state
image to restore after a state transfer), applies the batches, calls `record_checkpoint(seq, image)`
at every multiple of `checkpoint_interval`, and calls `advance()`.

Normal case: the primary batches requests into a signed pre-prepare; backups answer with signed
prepares (carrying the primary's header signature, so a second digest for the same slot is a
transferable proof of equivocation); q-1 prepares make a slot prepared, q commits make it
committed; slots execute in order. Every `checkpoint_interval` sequences replicas exchange signed
checkpoints; q matching ones make a stable checkpoint that moves the low watermark and garbage-
collects the log. A request not executed within `request_timeout` ticks, or proof of equivocation,
starts a view change; the new primary proves its new view with q signed view-change messages.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import msgspec

from dwcp_agent.acp.auth import KeyRing
from dwcp_agent.acp.byzantine import ByzantineDetector, signed_statement
from dwcp_agent.acp.messages import (
    Checkpoint,
    Commit,
    NewView,
    PbftMessage,
    PbftWire,
    Prepare,
    PreparedProof,
    PrePrepare,
    Reply,
    Request,
    RequestFwd,
    StateFetch,
    StateReply,
    ViewChange,
    decode_pbft,
    encode,
)
from dwcp_agent.acp.pbft.certs import (
    Quorums,
    batch_digest,
    checkpoint_bytes,
    client_node,
    compute_new_view,
    new_view_bytes,
    pp_header,
    prepare_bytes,
    request_bytes,
    valid_checkpoint_proof,
    valid_request,
    valid_view_change,
    view_change_bytes,
)

__all__ = ["MAX_BACKOFF", "Pbft", "PbftOptions", "PbftReady"]

MAX_BACKOFF = 5  # timeouts double per failed view change, up to 32 times the base


@dataclass
class PbftOptions:
    """Batching, watermarks and timeouts (ticks); `unsafe_quorum` is a test hook only."""

    checkpoint_interval: int = 32
    window: int = 128
    max_batch: int = 256
    max_inflight: int = 8
    request_timeout: int = 40
    view_change_timeout: int = 40
    retransmit_ticks: int = 8
    unsafe_quorum: int = 0


@dataclass
class _Slot:
    view: int
    pp: PrePrepare | None = None
    prepares: dict[str, Prepare] = field(default_factory=dict)
    commits: dict[str, bytes] = field(default_factory=dict)
    prepared: bool = False
    committed: bool = False


@dataclass
class PbftReady:
    """Messages to send (already authenticated), committed batches, and a state image to restore."""

    messages: list[tuple[str, PbftWire]]
    committed: list[tuple[int, list[Request]]]
    restore: tuple[int, bytes] | None
    view: int
    primary: str
    view_changes: int


class Pbft:
    """One PBFT replica. `stable` is the (seq, state image) it starts from (0 and the base image)."""

    def __init__(self, node_id: str, replicas: list[str], *, keys: KeyRing, detector: ByzantineDetector,
                 options: PbftOptions | None = None, view: int = 0, stable: tuple[int, bytes] = (0, b""),
                 stable_proof: list[Checkpoint] | None = None, prepared: list[PreparedProof] | None = None,
                 incarnation: int = 0, spoke: tuple[int, int] | None = None) -> None:
        self.id = node_id
        self.opts = options or PbftOptions()
        self.qs = Quorums(tuple(sorted(replicas)), self.opts.unsafe_quorum)
        self.keys = keys
        self.det = detector
        self.view = view
        self.active = True
        self.low, self.stable_data = stable
        self.stable_proof = list(stable_proof or [])
        self.last_exec = self.low
        self.next_seq = self.low + 1
        self.slots: dict[int, _Slot] = {}
        self.requests: dict[tuple[str, int], Request] = {}  # known, not executed yet
        self.waiting: dict[tuple[str, int], int] = {}  # key -> tick first seen (request timer)
        self.queue: dict[tuple[str, int], Request] = {}  # known, not assigned a sequence number
        self.last_ts: dict[str, int] = {}
        self.checkpoints: dict[int, dict[str, Checkpoint]] = {}
        self.snapshots: dict[int, bytes] = {self.low: self.stable_data}
        self.vcs: dict[int, dict[str, ViewChange]] = {}
        self.nv_sent: set[int] = set()
        self.now = 0
        self.vc_started = 0
        self.vc_quorum_at: int | None = None  # when q view changes for the pending view were seen
        self.vc_attempt = 0  # consecutive view changes without progress: the timeouts double
        self.req_timer: int | None = None  # started when a request waits, restarted on every execution
        self.lag_grace = False  # the request timer was extended once because this replica lagged
        self.peer_views: dict[str, int] = {}  # highest view each peer showed beyond ours
        self.heard: set[str] = set()  # replicas this incarnation has had an authenticated frame from
        self._nv_resent: dict[str, int] = {}
        self.fetching = 0
        self._exec_at_retransmit = self.last_exec  # last_exec at the previous retransmission period
        self.view_changes = 0
        self._last_vc: ViewChange | None = None
        self._last_nv: NewView | None = None
        self._nonce = incarnation << 32
        # `spoke` bounds the (view, seq) of every pre-prepare, prepare, commit and new view sent; it
        # is persisted ahead (in steps of max_inflight) before anything beyond it leaves. After a
        # restart the replica stays silent at or below the recovered bound, where it may have
        # forgotten what it said, and takes part at once above it. A fresh replica has no bound.
        self.spoke = spoke or (-1, 0)
        self.said = (-1, 0)  # highest (view, seq) sent by this incarnation
        self.spoke_dirty = False
        self.mute = spoke or (-1, 0)
        self.new_prepared: list[PreparedProof] = []
        # P set: per sequence, the prepared certificate of the highest view. It outlives views (the
        # view-change message must carry it) and is only dropped below a stable checkpoint.
        self.pset: dict[int, PreparedProof] = {}
        for proof in prepared or []:
            self._remember_prepared(proof)
        self._out: list[tuple[str, PbftWire]] = []
        self._committed: list[tuple[int, list[Request]]] = []
        self._restore: tuple[int, bytes] | None = None
        self.replies: list[tuple[str, Reply]] = []  # from other replicas, for the caller to count
        if view > 0:
            # Restarted inside a view it may never have entered (it crashed during the view change)
            # or whose new-view message it forgot: it asks again with a view change for it. Replicas
            # active in that view answer with the new-view message that started it.
            self.active = False
            self._send_view_change()

    # ------------------------------------------------------------ helpers
    @property
    def primary(self) -> str:
        return self.qs.primary(self.view)

    @property
    def high(self) -> int:
        return self.low + self.opts.window

    def _send(self, to: str, msg: PbftMessage) -> None:
        self._send_body(to, encode(msg))

    def _send_body(self, to: str, body: bytes) -> None:
        self._nonce += 1
        nonce_b = self._nonce.to_bytes(8, "big")
        self._out.append((to, PbftWire(self._nonce, body, self.keys.mac(to, nonce_b + body))))

    def _bcast(self, msg: PbftMessage) -> None:
        if isinstance(msg, PrePrepare | Prepare | Commit):
            if msg.view == self.mute[0] and msg.seq <= self.mute[1]:
                return
            self._note_spoken(msg.view, msg.seq)
        body = encode(msg)
        for peer in self.qs.replicas:
            if peer != self.id:
                self._send_body(peer, body)

    def _note_spoken(self, view: int, seq: int) -> None:
        self.said = max(self.said, (view, seq))
        if view > self.spoke[0] or (view == self.spoke[0] and seq > self.spoke[1]):
            self.spoke = (view, seq + self.opts.max_inflight)
            self.spoke_dirty = True

    def _extend_spoke(self) -> None:
        """A prepared certificate is about to be written anyway: move the speak bound ahead of what
        was said in the same write, so the next slots' messages need no write of their own (the
        bound stays within max_inflight of what was said, as before)."""
        ahead = (self.said[0], self.said[1] + self.opts.max_inflight)
        if self.said[0] >= 0 and ahead > self.spoke:
            self.spoke = ahead
            self.spoke_dirty = True

    def _slot(self, seq: int) -> _Slot:
        slot = self.slots.get(seq)
        if slot is None or slot.view < self.view:
            slot = self.slots[seq] = _Slot(self.view)
        return slot

    # ------------------------------------------------------------ input
    def submit(self, req: Request) -> None:
        """A local client's request: signed by this node and broadcast so every replica can watch the
        primary. The active primary keeps its own clients' requests, unsigned: its signed pre-prepare
        header (the digest covers the batch) vouches for them to the backups (three frames and one
        signature fewer per request). A primary that sat on them would only stall its own
        clients, whose retries are signed and broadcast once it is no longer primary; an unsigned
        copy is never re-proposed by another primary (see `_flush`)."""
        if self.active and self.primary == self.id:
            self._accept_request(Request(req.client, req.ts, req.op, b""))
            return
        signed = Request(req.client, req.ts, req.op, self.keys.sign(request_bytes(req)))
        self._accept_request(signed)
        self._bcast(RequestFwd(signed))

    def receive(self, sender: str, wire: PbftWire) -> None:
        """Authenticate, decode and dispatch one frame from `sender` (the authenticated link peer)."""
        if sender not in self.qs.replicas or sender == self.id or self.det.is_quarantined(sender):
            return
        if not self.det.admit(sender):
            return
        if not self.keys.check_mac(sender, wire.nonce.to_bytes(8, "big") + wire.body, wire.mac):
            self.det.report(sender, "invalid_mac")
            return
        if not self.det.fresh(sender, wire.nonce):
            return
        if sender not in self.heard:
            # A replica heard for the first time (one that started after us, the primary among
            # them) gets a full request period before we suspect anyone: at most n-1 restarts.
            self.heard.add(sender)
            if self.req_timer is not None:
                self.req_timer = self.now
        try:
            msg = decode_pbft(wire.body)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, ValueError) as exc:
            self.det.report(sender, "malformed", str(exc)[:80])
            return
        self.step(sender, msg)

    def step(self, sender: str, msg: PbftMessage) -> None:
        """Dispatch an authenticated message."""
        if isinstance(msg, PrePrepare | Prepare | Commit | ViewChange | NewView) and msg.view > self.view:
            self._note_view(sender, msg.view)
        if not self._signers_known(msg):
            return  # a key not learnt yet (the handshake with that node is pending) is no evidence
        if isinstance(msg, RequestFwd):
            # Straight from the client's own node, the link's MAC already proves the origin; the
            # signature is checked only for requests relayed by someone else (or by the primary
            # that orders it). Only pre-prepares carry unsigned requests: a forwarded one must be
            # signed.
            if not msg.request.sig:
                self.det.report(sender, "invalid_signature", "unsigned request")
            elif sender == client_node(msg.request.client) or valid_request(self.keys, msg.request):
                self._accept_request(msg.request)
            else:
                self.det.report(sender, "invalid_signature", "request")
        elif isinstance(msg, PrePrepare):
            self._on_pre_prepare(sender, msg)
        elif isinstance(msg, Prepare):
            self._on_prepare(sender, msg)
        elif isinstance(msg, Commit):
            self._on_commit(sender, msg)
        elif isinstance(msg, Checkpoint):
            self._on_checkpoint(sender, msg)
        elif isinstance(msg, ViewChange):
            self._on_view_change(sender, msg)
        elif isinstance(msg, NewView):
            self._on_new_view(sender, msg)
        elif isinstance(msg, StateFetch):
            data = self.snapshots.get(msg.seq)
            if data is not None:
                self._send(sender, StateReply(msg.seq, data, self.id))
        elif isinstance(msg, StateReply):
            self._on_state_reply(msg)
        elif isinstance(msg, Reply):
            if msg.replica == sender:
                self.replies.append((sender, msg))
            else:
                self.det.report(sender, "malformed", "reply for another replica")

    def _authentic(self, req: Request, primary: str) -> bool:
        """A request of the primary's own clients is vouched for by the primary's signature over the
        batch digest (the same node would have signed it); one we already hold byte for byte (from
        its node's authenticated link) needs no check either; anything else does."""
        return (client_node(req.client) == primary or self.requests.get((req.client, req.ts)) == req
                or valid_request(self.keys, req))

    def _signers_known(self, msg: PbftMessage) -> bool:
        keys = self.keys
        if isinstance(msg, RequestFwd):
            return keys.knows(client_node(msg.request.client))
        if isinstance(msg, PrePrepare):
            return keys.knows(self.qs.primary(msg.view)) and all(keys.knows(client_node(r.client)) for r in msg.batch)
        if isinstance(msg, Prepare):
            return keys.knows(msg.replica) and keys.knows(self.qs.primary(msg.view))
        if isinstance(msg, Checkpoint):
            return keys.knows(msg.replica)
        return True

    def send_reply(self, to: str, reply: Reply) -> None:
        """Results of executed requests to the node of their clients (authenticated like the rest)."""
        self._send(to, reply)

    def _accept_request(self, req: Request) -> None:
        key = (req.client, req.ts)
        if req.ts <= self.last_ts.get(req.client, 0):
            return
        if key in self.waiting:
            held = self.requests.get(key)
            if req.sig and held is not None and not held.sig:
                # The signed retry of a request we only knew from its own node's pre-prepare: this
                # copy can be re-proposed by any primary.
                self.requests[key] = req
                if key in self.queue:
                    self.queue[key] = req
            return
        if self.req_timer is None:
            self.req_timer = self.now
        self.waiting[key] = self.now
        self.requests[key] = req
        self.queue[key] = req

    # ------------------------------------------------------------ normal case
    def _flush(self) -> None:
        """Primary: cut batches from the queue while the window and the pipeline allow."""
        if not self.active or self.primary != self.id:
            return
        if self.view == self.mute[0]:
            self.next_seq = max(self.next_seq, self.mute[1] + 1)
        while self.queue and self.next_seq <= self.high and self.next_seq - self.last_exec <= self.opts.max_inflight:
            batch: list[Request] = []
            for key in list(self.queue):
                req = self.queue.pop(key)
                if req.ts <= self.last_ts.get(req.client, 0):
                    continue
                # Backups holding the same bytes skip the check, so the primary makes it once for
                # all: a request it took on its link's word must carry a valid signature to go out.
                # Its own clients' requests it signed itself.
                if client_node(req.client) != self.id and not valid_request(self.keys, req):
                    if req.sig:
                        self.det.report(client_node(req.client), "invalid_signature", "request")
                    # Unsigned: adopted from its own node's pre-prepare in an earlier view, where
                    # that primary's header signature vouched for it. Nobody else can vouch for it
                    # now; its client's signed retry brings it back.
                    self.waiting.pop(key, None)
                    self.requests.pop(key, None)
                    continue
                batch.append(req)
                if len(batch) >= self.opts.max_batch:
                    break
            if not batch:
                return
            self._issue(self.next_seq, batch)
            self.next_seq += 1

    def _issue(self, seq: int, batch: list[Request]) -> None:
        digest = batch_digest(batch)
        pp = PrePrepare(self.view, seq, digest, batch, self.keys.sign(pp_header(self.view, seq, digest)))
        slot = self._slot(seq)
        slot.pp = pp
        self._bcast(pp)
        self._check_prepared(seq, slot)

    def _on_pre_prepare(self, sender: str, m: PrePrepare) -> None:
        if not self.active or m.view != self.view or sender != self.primary or not self.low < m.seq <= self.high:
            return
        known = self.slots.get(m.seq)
        if known is not None and known.view == m.view and known.pp is not None and known.pp.digest == m.digest:
            return  # a retransmission of what we hold (or adopted from the new view): nothing to check
        if not self.keys.verify(sender, pp_header(m.view, m.seq, m.digest), m.sig):
            self.det.report(sender, "invalid_signature", "pre-prepare")
            return
        if batch_digest(m.batch) != m.digest or not all(self._authentic(r, sender) for r in m.batch):
            self.det.report(sender, "malformed", "pre-prepare batch")
            return
        slot = self._slot(m.seq)
        if slot.pp is not None:
            if slot.pp.digest != m.digest:
                self._equivocation(sender, slot.pp, m.view, m.digest, m.sig)
            return
        self._adopt(slot, m)

    def _adopt(self, slot: _Slot, m: PrePrepare) -> None:
        slot.pp = m
        for req in m.batch:
            key = (req.client, req.ts)
            self.queue.pop(key, None)
            if req.ts > self.last_ts.get(req.client, 0):
                self.waiting.setdefault(key, self.now)
                self.requests.setdefault(key, req)
                if self.req_timer is None:
                    self.req_timer = self.now
        if self.id != self.qs.primary(m.view):
            prep = Prepare(m.view, m.seq, m.digest, self.id, m.sig)
            prep.sig = self.keys.sign(prepare_bytes(prep))
            slot.prepares[self.id] = prep
            self._bcast(prep)
        self._check_prepared(m.seq, slot)

    def _equivocation(self, primary: str, pp: PrePrepare, view: int, digest: bytes, sig: bytes) -> None:
        """Two pre-prepares signed by `primary` for one slot: the signed headers are the evidence."""
        if primary == self.id:
            return
        evidence = (signed_statement(primary, pp_header(pp.view, pp.seq, pp.digest), pp.sig),
                    signed_statement(primary, pp_header(view, pp.seq, digest), sig)) if pp.view == view else ()
        self.det.report(primary, "equivocation", f"view {self.view} seq {pp.seq}", evidence)
        self._start_view_change(self.view + 1)

    def _on_prepare(self, sender: str, m: Prepare) -> None:
        if m.replica != sender:
            self.det.report(sender, "malformed", "prepare for another replica")
            return
        if not self.active or m.view != self.view or sender == self.primary or not self.low < m.seq <= self.high:
            return
        known = self.slots.get(m.seq)
        if known is not None and known.view == m.view and known.prepares.get(sender) == m:
            return  # a retransmission of the prepare we hold: checked when it first came
        if not self.keys.verify(sender, prepare_bytes(m), m.sig):
            self.det.report(sender, "invalid_signature", "prepare")
            return
        if not self.keys.verify(self.primary, pp_header(m.view, m.seq, m.digest), m.pp_sig):
            self.det.report(sender, "invalid_signature", "prepare carries a forged pre-prepare")
            return
        slot = self._slot(m.seq)
        if slot.pp is not None and slot.pp.digest != m.digest:
            self._equivocation(self.primary, slot.pp, m.view, m.digest, m.pp_sig)
            return
        slot.prepares[sender] = m
        self._check_prepared(m.seq, slot)

    def _check_prepared(self, seq: int, slot: _Slot) -> None:
        if slot.prepared or slot.pp is None:
            return
        matching = sum(1 for p in slot.prepares.values() if p.digest == slot.pp.digest)
        if matching >= self.qs.q - 1:
            slot.prepared = True
            proof = PreparedProof(slot.pp, [p for p in slot.prepares.values() if p.digest == slot.pp.digest])
            self._remember_prepared(proof)
            self.new_prepared.append(proof)
            slot.commits[self.id] = slot.pp.digest
            self._bcast(Commit(slot.view, seq, slot.pp.digest, self.id))
            self._extend_spoke()
            self._check_committed(seq, slot)

    def _remember_prepared(self, proof: PreparedProof) -> None:
        pp = proof.pre_prepare
        known = self.pset.get(pp.seq)
        if pp.seq > self.low and (known is None or known.pre_prepare.view < pp.view):
            self.pset[pp.seq] = proof

    def _on_commit(self, sender: str, m: Commit) -> None:
        if m.replica != sender:
            self.det.report(sender, "malformed", "commit for another replica")
            return
        if not self.active or m.view != self.view or not self.low < m.seq <= self.high:
            return
        slot = self._slot(m.seq)
        slot.commits[sender] = m.digest
        self._check_committed(m.seq, slot)

    def _check_committed(self, seq: int, slot: _Slot) -> None:
        if slot.committed or not slot.prepared or slot.pp is None:
            return
        if sum(1 for d in slot.commits.values() if d == slot.pp.digest) >= self.qs.q:
            slot.committed = True
            self._execute()

    def _execute(self) -> None:
        while True:
            slot = self.slots.get(self.last_exec + 1)
            if slot is None or not slot.committed or slot.pp is None:
                return
            self.last_exec += 1
            # The whole batch goes out: replicas' dedup memories differ after restarts and state
            # transfers, so filtering here would make them diverge. The registry's sessions dedup.
            batch = list(slot.pp.batch)
            for req in slot.pp.batch:
                self.last_ts[req.client] = max(self.last_ts.get(req.client, 0), req.ts)
                key = (req.client, req.ts)
                self.waiting.pop(key, None)
                self.queue.pop(key, None)
                self.requests.pop(key, None)
            self._committed.append((self.last_exec, batch))
            self._progress()

    def _progress(self) -> None:
        """Something executed: the view works, so timeouts return to their base and the request
        timer restarts for whatever still waits."""
        self.vc_attempt = 0
        self.lag_grace = False
        self.req_timer = self.now if self.waiting else None

    # ------------------------------------------------------------ checkpoints and state transfer
    def record_checkpoint(self, seq: int, image: bytes) -> None:
        """Caller applied everything up to `seq` (a checkpoint multiple): sign and share the image's
        SHA-256, keep the image for state transfer."""
        self.snapshots[seq] = image
        ck = Checkpoint(seq, hashlib.sha256(image).digest(), self.id)
        ck.sig = self.keys.sign(checkpoint_bytes(ck))
        self.checkpoints.setdefault(seq, {})[self.id] = ck
        self._bcast(ck)
        self._check_stable(seq)

    def _on_checkpoint(self, sender: str, m: Checkpoint) -> None:
        if m.replica != sender or m.seq % self.opts.checkpoint_interval:
            self.det.report(sender, "malformed", "checkpoint")
            return
        if m.seq <= self.low:
            return
        if not self.keys.verify(sender, checkpoint_bytes(m), m.sig):
            self.det.report(sender, "invalid_signature", "checkpoint")
            return
        far = self.high + self.opts.window
        if m.seq > far:
            # From a cluster that moved on while this replica was down: keep only each sender's
            # newest such checkpoint, so a faulty sender cannot grow the table; a quorum of
            # matching ones still makes it stable and starts a state transfer.
            for seq in [s for s, by in self.checkpoints.items() if s > far and sender in by]:
                del self.checkpoints[seq][sender]
                if not self.checkpoints[seq]:
                    del self.checkpoints[seq]
        self.checkpoints.setdefault(m.seq, {})[sender] = m
        self._check_stable(m.seq)

    def _check_stable(self, seq: int) -> None:
        proof = list(self.checkpoints.get(seq, {}).values())
        digest = valid_checkpoint_proof(self.keys, self.qs, seq, proof)
        if digest is None or seq <= self.low:
            return
        self._make_stable(seq, [c for c in proof if c.state == digest])

    def _make_stable(self, seq: int, proof: list[Checkpoint]) -> None:
        self.low = seq
        self.stable_proof = proof
        self.stable_data = self.snapshots.get(seq, b"")
        for s in [s for s in self.slots if s <= seq]:
            del self.slots[s]
        for s in [s for s in self.pset if s <= seq]:
            del self.pset[s]
        for s in [s for s in self.checkpoints if s < seq]:
            del self.checkpoints[s]
        for s in [s for s in self.snapshots if s < seq]:
            del self.snapshots[s]
        self.next_seq = max(self.next_seq, seq + 1)
        if self.last_exec < seq:
            self._fetch_state()

    def _fetch_state(self) -> None:
        peers = [c.replica for c in self.stable_proof if c.replica != self.id]
        if peers:
            self._send(peers[self.fetching % len(peers)], StateFetch(self.low, self.id))
            self.fetching += 1

    def _on_state_reply(self, m: StateReply) -> None:
        if m.seq != self.low or self.last_exec >= m.seq or not self.stable_proof:
            return
        if hashlib.sha256(m.data).digest() != self.stable_proof[0].state:
            self.det.report(m.replica, "malformed", "state does not match the stable checkpoint")
            return
        self.last_exec = m.seq
        self.snapshots[m.seq] = self.stable_data = m.data
        self._restore = (m.seq, m.data)
        self._committed = [(s, b) for s, b in self._committed if s > m.seq]
        # The image does not say which requests it executed: forget the ones we were waiting for
        # (their clients retry, and a retry of an executed one is answered from the sessions), so a
        # stale entry cannot time out and push this replica into a view change alone.
        self.waiting, self.requests, self.queue = {}, {}, {}
        self._progress()
        self._execute()

    # ------------------------------------------------------------ view change
    def _start_view_change(self, view: int) -> None:
        if view <= self.view:
            return
        self.view = view
        self.active = False
        self.view_changes += 1
        self.peer_views = {p: v for p, v in self.peer_views.items() if v > view}
        self._send_view_change()

    def _send_view_change(self) -> None:
        view = self.view
        self.vc_started = self.now
        self.vc_quorum_at = None
        # Certificates of this view itself (a replica restarted inside a view it had entered asks
        # to be let back in) say nothing about forming it, and the others reject a view change that
        # carries them.
        prepared = [proof for seq, proof in sorted(self.pset.items())
                    if self.low < seq <= self.high and proof.pre_prepare.view < view]
        vc = ViewChange(view, self.low, self.stable_proof, prepared, self.id)
        vc.sig = self.keys.sign(view_change_bytes(vc))
        self._last_vc = vc
        self.vcs.setdefault(view, {})[self.id] = vc
        self._bcast(vc)
        self._maybe_new_view(view)

    def _note_view(self, sender: str, view: int) -> None:
        """View synchronisation (Castro-Liskov): f+1 replicas showing views above ours include an
        honest one, so we move to the (f+1)-th highest of them; a replica already there answers our
        view change with the new-view message, and we enter that view without a timeout."""
        if self.peer_views.get(sender, -1) >= view:
            return
        self.peer_views[sender] = view
        ahead = sorted((v for v in self.peer_views.values() if v > self.view), reverse=True)
        if len(ahead) > self.qs.f:
            self._start_view_change(ahead[self.qs.f])

    def _on_view_change(self, sender: str, m: ViewChange) -> None:
        if m.replica != sender or m.view < self.view:
            return
        if m.view == self.view and self.active:
            nv = self._last_nv
            if nv is not None and nv.view == self.view and self.now - self._nv_resent.get(sender, -10) >= 5:
                self._nv_resent[sender] = self.now
                self._send(sender, nv)  # it missed (or forgot) the new view: any member may forward it
            return
        if not valid_view_change(self.keys, self.qs, m, self.opts.window):
            self.det.report(sender, "invalid_view_change", f"view {m.view}")
            return
        self.vcs.setdefault(m.view, {})[sender] = m
        self._maybe_new_view(m.view)

    def _maybe_new_view(self, view: int) -> None:
        vcs = self.vcs.get(view, {})
        if view != self.view or self.active or len(vcs) < self.qs.q:
            return
        if self.vc_quorum_at is None:
            self.vc_quorum_at = self.now  # the view-change timer starts only with a quorum behind it
        if self.qs.primary(view) != self.id or view in self.nv_sent or view == self.mute[0]:
            return
        chosen = [vcs[r] for r in sorted(vcs)][: self.qs.q]
        _min_s, plan = compute_new_view(view, chosen)
        pps = [PrePrepare(view, seq, d, b, self.keys.sign(pp_header(view, seq, d))) for seq, d, b in plan]
        nv = NewView(view, chosen, pps)
        nv.sig = self.keys.sign(new_view_bytes(nv))
        self.nv_sent.add(view)
        self._note_spoken(view, max([self.low, *(p.seq for p in pps)]))
        self._bcast(nv)
        self._enter_view(nv)

    def _on_new_view(self, sender: str, m: NewView) -> None:
        if m.view < self.view or (m.view == self.view and self.active):
            return
        if not self._valid_new_view(m):
            # Forwarded new views are welcome, so the evidence is against whoever sent this one.
            self.det.report(sender, "invalid_view_change", f"new view {m.view}")
            if sender == self.qs.primary(m.view):
                self._start_view_change(m.view + 1)
            return
        self.view = m.view
        self._enter_view(m)

    def _valid_new_view(self, m: NewView) -> bool:
        if not self.keys.verify(self.qs.primary(m.view), new_view_bytes(m), m.sig):
            return False
        who = {vc.replica for vc in m.view_changes if vc.view == m.view
               and valid_view_change(self.keys, self.qs, vc, self.opts.window)}
        if len(who) < self.qs.q:
            return False
        _min_s, plan = compute_new_view(m.view, m.view_changes)
        if [(s, d) for s, d, _ in plan] != [(p.seq, p.digest) for p in m.pre_prepares]:
            return False
        primary = self.qs.primary(m.view)
        return all(batch_digest(p.batch) == p.digest and p.view == m.view
                   and self.keys.verify(primary, pp_header(p.view, p.seq, p.digest), p.sig) for p in m.pre_prepares)

    def _enter_view(self, nv: NewView) -> None:
        self.active = True
        self._last_vc = None
        self._last_nv = nv
        self.vc_quorum_at = None
        self.peer_views = {p: v for p, v in self.peer_views.items() if v > nv.view}
        reissued = {(r.client, r.ts) for pp in nv.pre_prepares for r in pp.batch}
        primary = self.qs.primary(nv.view)
        for key in [k for k, r in self.requests.items()
                    if not r.sig and client_node(r.client) != primary and k not in reissued]:
            # Known only unsigned, from its node's pre-prepare in an earlier view: this primary
            # cannot order it, so waiting for it would only time this view out. If its node is
            # alive, its client's signed retry brings it back.
            self.waiting.pop(key, None)
            self.requests.pop(key, None)
        self.waiting = dict.fromkeys(self.waiting, self.now)
        self.req_timer = self.now if self.waiting else None
        best = max(nv.view_changes, key=lambda vc: vc.stable_seq)
        if best.stable_seq > self.low:
            self._make_stable(best.stable_seq, best.checkpoints)
        self.slots = {s: slot for s, slot in self.slots.items() if s <= self.low}
        self.vcs = {v: d for v, d in self.vcs.items() if v > nv.view}
        self.next_seq = max([self.low, *(p.seq for p in nv.pre_prepares)]) + 1
        self.queue = {k: r for k, r in self.requests.items() if k not in reissued}
        for pp in nv.pre_prepares:
            if pp.seq > self.low:
                self._adopt(self._slot(pp.seq), pp)

    # ------------------------------------------------------------ time and output
    def tick(self) -> None:
        """Advance time: request and view-change timers, state-transfer retries."""
        self.now += 1
        self.det.tick()
        backoff = min(self.vc_attempt, MAX_BACKOFF)
        if self.active:
            if self.req_timer is not None and self.now - self.req_timer > self.opts.request_timeout << backoff:
                if len(self.heard) < self.qs.q - 1:
                    # Not one authenticated frame yet from enough replicas to make a view change
                    # succeed (a node starting before the others): a view change now would only
                    # strand this replica alone in a higher view. Wait another period.
                    self.req_timer = self.now
                elif self._lagging() and not self.lag_grace:
                    # The lag may be ours, not the primary's: one more period to catch up first.
                    # (It may also be a slot nobody can commit: then the view change comes next.)
                    self.lag_grace = True
                    self.req_timer = self.now
                else:
                    self._start_view_change(self.view + 1)
        elif (self.vc_quorum_at is not None
              and self.now - self.vc_quorum_at > self.opts.view_change_timeout << backoff):
            # q replicas wanted this view and its primary did not deliver: next view, twice the wait.
            # Alone (no quorum) a replica never escalates, so it cannot run ahead of the others.
            self.vc_attempt += 1
            self._start_view_change(self.view + 1)
        elif (self.now - self.vc_started) % 10 == 0 and self._last_vc is not None:
            self._bcast(self._last_vc)  # view changes are rare and vital: resend until the new view
        if self.last_exec < self.low and self.now % 5 == 0:
            self._fetch_state()
        if self.active and self.now % self.opts.retransmit_ticks == 0:
            self._retransmit()

    def _lagging(self) -> bool:
        """Fetching the state, or holding committed slots past a gap (missed while down): the
        others make progress, this replica waits for the next stable checkpoint to catch up."""
        return self.last_exec < self.low or any(slot.committed for seq, slot in self.slots.items()
                                                if seq > self.last_exec + 1)

    def _retransmit(self) -> None:
        """Links may lose messages: resend our part of every slot that has not executed yet, and of
        the last few that have (a replica that missed their commits, or their pre-prepare while it
        was restarting, would otherwise wait for the next stable checkpoint with the pipeline stuck
        behind it). While slots execute here, only every fourth period: under steady load these
        resends were one frame in eight and almost never needed. A stuck primary stops everyone's
        progress, so then all resend at once; a backup that lags alone waits at most four periods
        (or the next stable checkpoint, announced below in every period)."""
        progressed = self.last_exec > self._exec_at_retransmit
        self._exec_at_retransmit = self.last_exec
        if progressed and self.last_exec >= self.low and self.now % (4 * self.opts.retransmit_ticks):
            self._resend_checkpoint()
            return
        first = max(self.low + 1, self.last_exec + 1 - 2 * self.opts.max_inflight)
        for seq in range(first, self.last_exec + 1 + self.opts.max_inflight):
            slot = self.slots.get(seq)
            if slot is None or slot.pp is None or slot.view != self.view:
                continue
            if self.primary == self.id:
                self._bcast(slot.pp)
            mine = slot.prepares.get(self.id)
            if mine is not None:
                self._bcast(mine)
            if slot.prepared:
                self._bcast(Commit(slot.view, seq, slot.pp.digest, self.id))
        self._resend_checkpoint()

    def _resend_checkpoint(self) -> None:
        """Our newest checkpoint, stable or not: a replica that missed it (restarted, cut off) learns
        the stable point from these and fetches the state instead of waiting for the next one."""
        own = self.checkpoints.get(max(self.checkpoints, default=-1), {}).get(self.id)
        if own is not None and own.seq >= self.low:
            self._bcast(own)

    def has_ready(self) -> bool:
        """True when there is output (or the primary could cut a batch)."""
        return bool(self._out or self._committed or self._restore or self.replies or self._can_cut())

    def _can_cut(self) -> bool:
        """The primary holds requests and the window and the pipeline have room for a batch (a full
        pipeline is no work: the caller would spin on it)."""
        return bool(self.queue and self.active and self.primary == self.id and self.next_seq <= self.high
                    and self.next_seq - self.last_exec <= self.opts.max_inflight)

    def ready(self) -> PbftReady:
        """Collect messages, committed batches and a pending restore."""
        self._flush()
        rd = PbftReady(self._out, self._committed, self._restore, self.view, self.primary, self.view_changes)
        self._out, self._committed, self._restore = [], [], None
        return rd

    def status(self) -> dict[str, object]:
        """Small JSON-able summary for health and the cluster API."""
        return {"id": self.id, "view": self.view, "primary": self.primary, "active": self.active,
                "low": self.low, "executed": self.last_exec, "replicas": list(self.qs.replicas),
                "f": self.qs.f, "quarantined": sorted(self.det.quarantined)}
