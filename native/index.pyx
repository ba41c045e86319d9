# cython: language_level=3
"""What the peer holds, seen from the sender: the tables behind cross-chunk references.

One `PeerIndex` per migration. It keeps, in preallocated arrays (no per-page Python objects):
  * per page sent: the 128-bit hash of the version last sent and whether the peer has
    acknowledged it (state UNSENT / SENT / ACKED). Pages are tracked in blocks of 16384 (64 MiB
    of image) drawn from a pool sized by `page_budget_bytes`; a block is taken when its first
    page is sent, so holes cost nothing, and when the pool is full the least recently used block
    is evicted: its pages become UNSENT, which only means they are no longer referenced;
  * a content table, fingerprint -> page, for dedupe across chunks;
  * the peer's baseline (its have-list): the hashes of its non-zero pages, with their page
    indexes in ascending order (holes and zero pages cost nothing), plus a fingerprint -> row table;
  * the XOR-delta cache: versions of pages sent more than once, two-way set associative, LRU
    within a set.
A reference is only emitted to a page whose content the peer is known to hold: a baseline page
(immutable for the whole migration) or a page whose latest sent version is ACKED and whose hash
matches in all 128 bits. Callers serialise calls (the encoder holds a lock); every method checks
its buffers once and then runs without the GIL.
"""

from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.string cimport memcpy

import numpy as np

from layout cimport PAGE

PAGE_SIZE = PAGE
cdef Py_ssize_t _PAGE = PAGE
cdef uint8_t K_LITERAL = 0, K_ZERO = 1, K_DUP_IN = 2, K_DUP_X = 3, K_BASELINE = 4, K_SAME = 5
cdef uint8_t K_DELTA = 6
cdef uint8_t S_UNSENT = 0, S_SENT = 1, S_ACKED = 2
cdef int _PROBES = 8
cdef int _BLOCK_SHIFT = 14
cdef Py_ssize_t _BLOCK = 1 << 14          # pages per block
cdef Py_ssize_t _BLOCK_BYTES = 17 << 14   # state byte + 128-bit hash per page


cdef inline Py_ssize_t _pow2_at_least(Py_ssize_t n):
    cdef Py_ssize_t cap = 16
    while cap < n:
        cap *= 2
    return cap


cdef class PeerIndex:
    cdef public object _state_arr, _hash_arr, _tkey_arr, _tpage_arr, _dir_arr, _owner_arr, _used_arr
    cdef public object _base_arr, _bkey_arr, _bpage_arr, _bidx_arr, _cache_arr, _ctag_arr, _clru_arr
    cdef int64_t[::1] bidx            # baseline row -> page index (ascending)
    cdef uint8_t[:, ::1] state        # [slot, page in block]
    cdef uint64_t[:, :, ::1] hashes   # [slot, page in block, 2]
    cdef int64_t[::1] blockdir        # block -> slot, -1 when not tracked
    cdef int64_t[::1] owner           # slot -> block, -1 when free
    cdef uint64_t[::1] used           # slot -> tick of last use (LRU eviction)
    cdef uint64_t tick
    cdef readonly Py_ssize_t slots, evictions
    cdef uint64_t[:, ::1] tkey
    cdef int64_t[::1] tpage
    cdef uint64_t[:, ::1] base
    cdef uint64_t[::1] bkey
    cdef int64_t[::1] bpage
    cdef uint8_t[:, ::1] cache
    cdef int64_t[::1] ctag
    cdef uint8_t[::1] clru
    cdef Py_ssize_t n_blocks, tmask, bmask, n_base, n_sets
    cdef readonly Py_ssize_t table_entries, cache_pages

    def __init__(self, Py_ssize_t table_entries=1 << 18, Py_ssize_t cache_bytes=0,
                 Py_ssize_t page_budget_bytes=128 << 20):
        """`table_entries` bounds the dedupe table (24 bytes each); `cache_bytes` the delta cache;
        `page_budget_bytes` the per-page state (17 bytes a page, in blocks of 64 MiB of image)."""
        self.table_entries = _pow2_at_least(max(table_entries, 16))
        self.tmask = self.table_entries - 1
        self._tkey_arr = np.zeros((self.table_entries, 2), dtype=np.uint64)
        self._tpage_arr = np.full(self.table_entries, -1, dtype=np.int64)
        self.tkey = self._tkey_arr
        self.tpage = self._tpage_arr
        # The pool is zeroed lazily by the kernel (calloc): untouched slots cost no memory.
        self.slots = max(page_budget_bytes // _BLOCK_BYTES, 4)
        self._state_arr = np.zeros((self.slots, _BLOCK), dtype=np.uint8)
        self._hash_arr = np.zeros((self.slots, _BLOCK, 2), dtype=np.uint64)
        self._owner_arr = np.full(self.slots, -1, dtype=np.int64)
        self._used_arr = np.zeros(self.slots, dtype=np.uint64)
        self.state, self.hashes, self.owner, self.used = self._state_arr, self._hash_arr, self._owner_arr, self._used_arr
        self.tick = 0
        self.evictions = 0
        self.n_blocks = 0
        self._grow(1024)
        self.n_sets = max(cache_bytes // _PAGE, 0) // 2
        self.cache_pages = 2 * self.n_sets
        self._cache_arr = np.zeros((self.cache_pages, _PAGE), dtype=np.uint8)
        self._ctag_arr = np.full(self.cache_pages, -1, dtype=np.int64)
        self._clru_arr = np.zeros(max(self.n_sets, 1), dtype=np.uint8)
        self.cache = self._cache_arr
        self.ctag = self._ctag_arr
        self.clru = self._clru_arr
        self.set_baseline(np.zeros(0, dtype=np.int64), np.zeros((0, 2), dtype=np.uint64))

    def _grow(self, Py_ssize_t pages):
        """Make the block directory cover `pages` (8 bytes per 64 MiB of image)."""
        cdef Py_ssize_t blocks = (pages + _BLOCK - 1) >> _BLOCK_SHIFT
        if blocks <= self.n_blocks:
            return
        blocks = max(blocks, 2 * self.n_blocks)
        blockdir = np.full(blocks, -1, dtype=np.int64)
        if self.n_blocks:
            blockdir[: self.n_blocks] = self._dir_arr
        self._dir_arr = blockdir
        self.blockdir = blockdir
        self.n_blocks = blocks

    cdef inline int64_t _slot(self, int64_t page) noexcept nogil:
        """The pool slot holding `page`'s block, or -1."""
        cdef int64_t block = page >> _BLOCK_SHIFT
        if page < 0 or block >= self.n_blocks:
            return -1
        return self.blockdir[block]

    cdef int64_t _take_slot(self, int64_t page) noexcept nogil:
        """The slot for `page`'s block, taking a free one or evicting the least recently used."""
        cdef int64_t block = page >> _BLOCK_SHIFT, s = self.blockdir[block], victim = 0, i
        self.tick += 1
        if s >= 0:
            self.used[s] = self.tick
            return s
        for i in range(self.slots):
            if self.owner[i] < 0:
                victim = i
                break
            if self.used[i] < self.used[victim]:
                victim = i
        if self.owner[victim] >= 0:
            self.blockdir[self.owner[victim]] = -1
            self.evictions += 1
            for i in range(_BLOCK):
                self.state[victim, i] = S_UNSENT
                self.hashes[victim, i, 0] = 0
                self.hashes[victim, i, 1] = 0
        self.owner[victim] = block
        self.blockdir[block] = victim
        self.used[victim] = self.tick
        return victim

    cdef inline uint8_t _state(self, int64_t page) noexcept nogil:
        cdef int64_t s = self._slot(page)
        return S_UNSENT if s < 0 else self.state[s, page & (_BLOCK - 1)]

    def set_baseline(self, const int64_t[::1] pages, const uint64_t[:, ::1] have):
        """Install the peer's have-list: `have[r]` is the hash of its baseline page `pages[r]`;
        `pages` ascending, rows of zero pages left out (a zero page is never referenced)."""
        cdef Py_ssize_t n = have.shape[0], cap = _pow2_at_least(2 * n), i, slot, probe
        if n and have.shape[1] != 2:
            raise ValueError("have-list rows must be (fingerprint, confirmation)")
        if pages.shape[0] != n:
            raise ValueError("one page index per have-list row")
        for i in range(1, n):
            if pages[i] <= pages[i - 1]:
                raise ValueError("have-list page indexes must ascend")
        if n and pages[0] < 0:
            raise ValueError("negative have-list page index")
        self._base_arr = np.ascontiguousarray(have, dtype=np.uint64).reshape(n, 2)
        self._bidx_arr = np.ascontiguousarray(pages, dtype=np.int64)
        self._bkey_arr = np.zeros(cap, dtype=np.uint64)
        self._bpage_arr = np.full(cap, -1, dtype=np.int64)
        self.base, self.bkey, self.bpage, self.bidx = self._base_arr, self._bkey_arr, self._bpage_arr, self._bidx_arr
        self.n_base, self.bmask = n, cap - 1
        with nogil:
            for i in range(n):
                if self.base[i, 0] == 0 and self.base[i, 1] == 0:
                    continue
                slot = <Py_ssize_t>(self.base[i, 0] & <uint64_t>self.bmask)
                for probe in range(cap):
                    if self.bpage[slot] < 0:
                        self.bkey[slot] = self.base[i, 0]
                        self.bpage[slot] = i
                        break
                    if self.bkey[slot] == self.base[i, 0]:
                        break
                    slot = (slot + 1) & self.bmask

    cdef inline Py_ssize_t _base_row_from(self, int64_t page) noexcept nogil:
        """The first baseline row whose page is >= `page` (binary search)."""
        cdef Py_ssize_t lo = 0, hi = self.n_base, mid
        while lo < hi:
            mid = (lo + hi) // 2
            if self.bidx[mid] < page:
                lo = mid + 1
            else:
                hi = mid
        return lo

    @property
    def baseline_pages(self):
        return self.n_base

    def cache_array(self):
        """The delta cache rows (read by delta.encode_deltas under the caller's lock)."""
        return self._cache_arr

    cdef inline int64_t _cache_find(self, int64_t page) noexcept nogil:
        cdef Py_ssize_t s
        if self.n_sets == 0:
            return -1
        s = 2 * (page % self.n_sets)
        if self.ctag[s] == page:
            return s
        if self.ctag[s + 1] == page:
            return s + 1
        return -1

    cdef inline void _cache_put(self, int64_t page, const uint8_t* content) noexcept nogil:
        cdef Py_ssize_t set_ = page % self.n_sets, s
        s = self._cache_find(page)
        if s < 0:
            s = 2 * set_ + self.clru[set_]   # clru names the least recently used way of the set
        self.ctag[s] = page
        memcpy(&self.cache[s, 0], content, _PAGE)
        self.clru[set_] = <uint8_t>((s - 2 * set_) ^ 1)

    cdef inline void _cache_drop(self, int64_t page) noexcept nogil:
        cdef int64_t s = self._cache_find(page)
        if s >= 0:
            self.ctag[s] = -1

    cdef inline int64_t _table_find(self, uint64_t lo, uint64_t hi) noexcept nogil:
        cdef Py_ssize_t slot = <Py_ssize_t>(lo & <uint64_t>self.tmask)
        cdef int probe
        for probe in range(_PROBES):
            if self.tpage[slot] < 0:
                return -1
            if self.tkey[slot, 0] == lo:
                return self.tpage[slot] if self.tkey[slot, 1] == hi else -1
            slot = (slot + 1) & self.tmask
        return -1

    cdef inline void _table_put(self, uint64_t lo, uint64_t hi, int64_t page) noexcept nogil:
        cdef Py_ssize_t slot = <Py_ssize_t>(lo & <uint64_t>self.tmask), first = slot, q
        cdef int probe
        for probe in range(_PROBES):
            q = self.tpage[slot]
            if q < 0 or self.tkey[slot, 0] == lo or not self._holds(q, self.tkey[slot, 0], self.tkey[slot, 1]):
                break
            slot = (slot + 1) & self.tmask
        else:
            slot = first
        if self.tpage[slot] >= 0 and self.tkey[slot, 0] == lo and self._holds(self.tpage[slot], lo, hi) \
                and self._state(self.tpage[slot]) == S_ACKED:
            return   # keep a reference the peer can already resolve
        self.tkey[slot, 0] = lo
        self.tkey[slot, 1] = hi
        self.tpage[slot] = page

    cdef inline bint _holds(self, int64_t page, uint64_t lo, uint64_t hi) noexcept nogil:
        cdef int64_t s = self._slot(page), i = page & (_BLOCK - 1)
        return s >= 0 and self.hashes[s, i, 0] == lo and self.hashes[s, i, 1] == hi

    cdef inline int64_t _base_find(self, uint64_t lo, uint64_t hi) noexcept nogil:
        cdef Py_ssize_t slot, probe
        cdef int64_t q
        if self.n_base == 0:
            return -1
        slot = <Py_ssize_t>(lo & <uint64_t>self.bmask)
        for probe in range(self.bmask + 1):
            q = self.bpage[slot]
            if q < 0:
                return -1
            if self.bkey[slot] == lo:
                return self.bidx[q] if self.base[q, 1] == hi else -1
            slot = (slot + 1) & self.bmask
        return -1

    def classify(self, Py_ssize_t page0, Py_ssize_t raw_len, const uint64_t[:, ::1] hashes,
                 uint8_t[::1] kinds, uint64_t[::1] refs, int64_t[::1] slots, bint use_delta=True):
        """Upgrade LITERAL pages of the chunk at page `page0` to references the peer can resolve.

        In order of preference: SAME (the peer's baseline has this page unchanged at this
        index), BASELINE (the baseline has it elsewhere), DUP_X (a page the peer acknowledged
        holds it), DELTA (the delta cache has the version the peer acknowledged at this index;
        `slots[p]` names the cache row). Every hit matches all 128 bits of the hash.
        """
        cdef Py_ssize_t pages = (raw_len + _PAGE - 1) // _PAGE, full = raw_len // _PAGE, p
        cdef int64_t P, q
        cdef uint64_t lo, hi
        cdef Py_ssize_t row
        if page0 < 0 or hashes.shape[0] < pages or kinds.shape[0] < pages or refs.shape[0] < pages \
                or slots.shape[0] < pages:
            raise ValueError("page arrays shorter than the chunk")
        self._grow(page0 + pages)
        with nogil:
            row = self._base_row_from(page0)   # the chunk's pages ascend: walk the rows with them
            for p in range(full):
                slots[p] = -1
                if kinds[p] != K_LITERAL:
                    continue
                P = page0 + p
                lo = hashes[p, 0]
                hi = hashes[p, 1]
                while row < self.n_base and self.bidx[row] < P:
                    row += 1
                if row < self.n_base and self.bidx[row] == P and self.base[row, 0] == lo \
                        and self.base[row, 1] == hi:
                    kinds[p] = K_SAME
                    continue
                q = self._base_find(lo, hi)
                if q >= 0:
                    kinds[p] = K_BASELINE
                    refs[p] = <uint64_t>q
                    continue
                q = self._table_find(lo, hi)
                if q >= 0 and self._state(q) == S_ACKED and self._holds(q, lo, hi):
                    kinds[p] = K_DUP_X
                    refs[p] = <uint64_t>q
                    continue
                if use_delta and self._state(P) == S_ACKED:
                    q = self._cache_find(P)
                    if q >= 0:
                        kinds[p] = K_DELTA
                        slots[p] = q

    def commit(self, Py_ssize_t page0, const uint8_t[::1] chunk, const uint64_t[:, ::1] hashes,
               const uint8_t[::1] kinds):
        """Record that this chunk's pages were sent: hashes, SENT state, content table, delta cache."""
        cdef Py_ssize_t raw_len = chunk.shape[0], pages = (raw_len + _PAGE - 1) // _PAGE
        cdef Py_ssize_t full = raw_len // _PAGE, p
        cdef int64_t P
        if page0 < 0 or hashes.shape[0] < pages or kinds.shape[0] < pages:
            raise ValueError("page arrays shorter than the chunk")
        self._grow(page0 + pages)
        if raw_len == 0:
            return
        cdef const uint8_t* base = &chunk[0]
        cdef bint resent
        cdef int64_t s = -1, i
        with nogil:
            for p in range(pages):
                P = page0 + p
                i = P & (_BLOCK - 1)
                if p == 0 or i == 0:
                    s = self._take_slot(P)
                # Like QEMU's xbzrle, the cache only takes pages sent a second time: the bulk
                # first pass costs no copies, and pages that do change again are the ones kept.
                resent = self.state[s, i] != S_UNSENT
                self.state[s, i] = S_SENT
                self.hashes[s, i, 0] = hashes[p, 0]
                self.hashes[s, i, 1] = hashes[p, 1]
                if p >= full or kinds[p] == K_ZERO:
                    if self.n_sets:
                        self._cache_drop(P)
                    continue
                self._table_put(hashes[p, 0], hashes[p, 1], P)
                if self.n_sets:
                    if resent:
                        self._cache_put(P, base + p * _PAGE)
                    else:
                        self._cache_drop(P)

    def ack(self, Py_ssize_t page0, Py_ssize_t pages):
        """The peer holds the versions last sent for pages [page0, page0 + pages) durably."""
        cdef Py_ssize_t p
        cdef int64_t s
        if page0 < 0 or pages < 0:
            raise ValueError("negative page range")
        self._grow(page0 + pages)
        with nogil:
            for p in range(page0, page0 + pages):
                s = self._slot(p)   # an evicted block stays untracked: its pages are never referenced
                if s >= 0 and self.state[s, p & (_BLOCK - 1)] == S_SENT:
                    self.state[s, p & (_BLOCK - 1)] = S_ACKED

    def forget_acks(self):
        """The peer's state is unknown again (a reconnect): no page may be referenced until re-acked."""
        cdef Py_ssize_t s, i
        with nogil:
            for s in range(self.slots):
                if self.owner[s] < 0:
                    continue
                for i in range(_BLOCK):
                    if self.state[s, i] == S_ACKED:
                        self.state[s, i] = S_SENT

    def page_state(self, Py_ssize_t page):
        """0 unsent, 1 sent, 2 acknowledged (for tests)."""
        return self._state(page)
