# cython: language_level=3
"""XOR delta of a page against a reference page, zero-run encoded; and the decoder's page pass.

Delta stream of one page (the page's length is known from context, never from the stream):
    repeated { zero_run: uvarint, dirty_run: uvarint >= 1, dirty_run bytes of new XOR old }
Zero runs are bytes where new == old; the trailing zero run is not encoded, so an unchanged page
is the empty stream. A dirty run ends at the next 8 equal bytes: a shorter equal stretch costs
more in run headers than it saves. Decoding XORs each dirty run into the reference copy already
in place, so it never reads or writes outside the page and the stream; any malformed stream
raises ValueError, which the Python layer reports as CodecError.
"""

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint64_t
from libc.string cimport memcpy, memset

from layout cimport PAGE

PAGE_SIZE = PAGE
cdef Py_ssize_t _PAGE = PAGE

# Page kinds, mirrored in dwcp_agent/hde/layout.py.
cdef uint8_t K_LITERAL = 0, K_ZERO = 1, K_DUP_IN = 2, K_DUP_X = 3, K_BASELINE = 4, K_SAME = 5
cdef uint8_t K_DELTA = 6


cdef extern from *:
    """
    static inline int dwcp_ctz64(unsigned long long x) { return __builtin_ctzll(x); }
    static inline int dwcp_clz64(unsigned long long x) { return __builtin_clzll(x); }
    """
    int dwcp_ctz64(uint64_t x) noexcept nogil
    int dwcp_clz64(uint64_t x) noexcept nogil


cdef inline uint64_t _xor_word(const uint8_t* a, const uint8_t* b) noexcept nogil:
    cdef uint64_t x, y
    memcpy(&x, a, 8)
    memcpy(&y, b, 8)
    return x ^ y


cdef inline Py_ssize_t _put_varint(uint8_t* out, Py_ssize_t o, Py_ssize_t value) noexcept nogil:
    while value >= 0x80:
        out[o] = <uint8_t>(value & 0x7F) | 0x80
        value >>= 7
        o += 1
    out[o] = <uint8_t>value
    return o + 1


cdef Py_ssize_t xor_encode_page(const uint8_t* new, const uint8_t* old, Py_ssize_t n,
                                uint8_t* out, Py_ssize_t limit) noexcept nogil:
    """Encode `new` against `old` (n bytes each) into out[:limit]; -1 when it does not fit."""
    cdef Py_ssize_t pos = 0, o = 0, zstart, dstart, end, i
    cdef uint64_t x
    cdef bint found
    while pos < n:
        zstart = pos
        found = False
        while pos + 8 <= n:
            x = _xor_word(new + pos, old + pos)
            if x:
                pos += dwcp_ctz64(x) >> 3
                found = True
                break
            pos += 8
        if not found:
            while pos < n and new[pos] == old[pos]:
                pos += 1
            if pos >= n:
                break
        dstart = pos
        end = pos + 1
        while True:
            if pos + 8 <= n:
                x = _xor_word(new + pos, old + pos)
                if x == 0:
                    break
                end = pos + 8 - (dwcp_clz64(x) >> 3)
                pos += 8
            else:
                while pos < n:
                    if new[pos] != old[pos]:
                        end = pos + 1
                    pos += 1
                break
        # 3 bytes per varint cover any run of a page up to 2 MiB.
        if o + 6 + (end - dstart) > limit:
            return -1
        o = _put_varint(out, o, dstart - zstart)
        o = _put_varint(out, o, end - dstart)
        for i in range(end - dstart):
            out[o + i] = new[dstart + i] ^ old[dstart + i]
        o += end - dstart
        pos = end
    return o


cdef inline Py_ssize_t _get_varint(const uint8_t* src, Py_ssize_t* i, Py_ssize_t end) noexcept nogil:
    """Next uvarint at src[i[0]:end], at most 3 bytes; -1 when truncated or too long."""
    cdef Py_ssize_t value = 0, shift = 0, k = i[0]
    cdef uint8_t b
    while True:
        if k >= end or shift > 14:
            return -1
        b = src[k]
        k += 1
        value |= <Py_ssize_t>(b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
    i[0] = k
    return value


cdef int xor_decode_page(const uint8_t* src, Py_ssize_t length, uint8_t* page, Py_ssize_t n) noexcept nogil:
    """Apply a delta stream to the reference bytes in page[:n]; 0 on success, -1 if malformed."""
    cdef Py_ssize_t i = 0, pos = 0, zrun, drun, j
    while i < length:
        zrun = _get_varint(src, &i, length)
        if zrun < 0 or zrun > n - pos:
            return -1
        pos += zrun
        drun = _get_varint(src, &i, length)
        if drun <= 0 or drun > n - pos or drun > length - i:
            return -1
        for j in range(drun):
            page[pos + j] ^= src[i + j]
        pos += drun
        i += drun
    return 0


def xor_encode(const uint8_t[::1] new, const uint8_t[::1] old, uint8_t[::1] out):
    """Delta of `new` against `old` (same length) into `out`; its length, or -1 if `out` is too small."""
    cdef Py_ssize_t n = new.shape[0], limit = out.shape[0], result
    cdef uint8_t dummy = 0
    if old.shape[0] != n:
        raise ValueError(f"pages differ in length: {n} and {old.shape[0]}")
    if n == 0:
        return 0
    with nogil:
        result = xor_encode_page(&new[0], &old[0], n, &out[0] if limit else &dummy, limit)
    return result


def xor_decode(const uint8_t[::1] delta, uint8_t[::1] page):
    """Apply `delta` to the reference bytes in `page`, in place; ValueError if malformed."""
    cdef Py_ssize_t length = delta.shape[0], n = page.shape[0]
    cdef int rc
    cdef uint8_t dummy = 0
    with nogil:
        rc = xor_decode_page(&delta[0] if length else &dummy, length, &page[0] if n else &dummy, n)
    if rc:
        raise ValueError("malformed delta stream")


def encode_deltas(const uint8_t[::1] chunk, const uint8_t[:, ::1] cache, uint8_t[::1] kinds,
                  const int64_t[::1] slots, uint8_t[::1] out, uint16_t[::1] lengths, Py_ssize_t page_limit):
    """Delta-encode every DELTA page of `chunk` against its cache slot, back to back into `out`.

    A page whose delta would exceed `page_limit` bytes (or the room left in `out`) is turned
    back into a literal. `lengths[k]` is the delta length of the k-th DELTA page that stayed.
    Returns (bytes written, number of delta pages).
    """
    cdef Py_ssize_t n = chunk.shape[0], full = chunk.shape[0] // _PAGE, p, o = 0, count = 0, r, room
    cdef Py_ssize_t cap = out.shape[0]
    if kinds.shape[0] < full or slots.shape[0] < full or lengths.shape[0] < full:
        raise ValueError("page arrays shorter than the chunk")
    if cache.shape[0] and cache.shape[1] != _PAGE:
        raise ValueError("cache rows must be one page")
    if page_limit > 0xFFFF:
        raise ValueError("page_limit must fit 16 bits")
    for p in range(full):
        if kinds[p] == K_DELTA and not (0 <= slots[p] < cache.shape[0]):
            raise ValueError(f"page {p}: cache slot {slots[p]} out of range")
    if n == 0:
        return 0, 0
    cdef const uint8_t* base = &chunk[0]
    cdef uint8_t dummy = 0
    cdef uint8_t* dst = &out[0] if cap else &dummy
    with nogil:
        for p in range(full):
            if kinds[p] != K_DELTA:
                continue
            room = min(page_limit, cap - o)
            r = xor_encode_page(base + p * _PAGE, &cache[slots[p], 0], _PAGE, dst + o, room)
            if r < 0:
                kinds[p] = K_LITERAL
            else:
                lengths[count] = <uint16_t>r
                count += 1
                o += r
    return o, count


def assemble(uint8_t[::1] out, Py_ssize_t raw_len, const uint8_t[::1] kinds, const uint64_t[::1] refs,
             const uint16_t[::1] delta_lengths, const uint8_t[::1] literals, const uint8_t[::1] deltas):
    """The decoder's page pass: build out[:raw_len] from a validated page map.

    Pages read from outside the chunk (DUP_X, BASELINE, SAME, and DELTA's reference) must
    already be in `out`. Fills ZERO and LITERAL pages, copies DUP_IN pages from an earlier page
    (the reference must point backwards), applies DELTA streams in place, and checks that the
    literal and delta sections are consumed exactly. Raises ValueError on any inconsistency.
    """
    cdef Py_ssize_t pages = (raw_len + _PAGE - 1) // _PAGE
    cdef Py_ssize_t p, length, lit = 0, dl = 0, d = 0, r = 0
    cdef Py_ssize_t n_lit = literals.shape[0], n_delta = deltas.shape[0], n_dl = delta_lengths.shape[0]
    cdef Py_ssize_t n_ref = refs.shape[0]
    cdef uint8_t k
    cdef uint64_t ref
    cdef int err = 0
    cdef Py_ssize_t bad = -1
    if raw_len < 0 or out.shape[0] < raw_len or kinds.shape[0] != pages:
        raise ValueError("page map does not match the chunk length")
    if raw_len == 0:
        return
    cdef uint8_t* dst = &out[0]
    cdef uint8_t dummy = 0
    cdef const uint8_t* lsrc = &literals[0] if n_lit else &dummy
    cdef const uint8_t* dsrc = &deltas[0] if n_delta else &dummy
    with nogil:
        for p in range(pages):
            k = kinds[p]
            length = min(_PAGE, raw_len - p * _PAGE)
            if k == K_ZERO:
                memset(dst + p * _PAGE, 0, length)
            elif k == K_LITERAL:
                if n_lit - lit < length:
                    err = 1
                    bad = p
                    break
                memcpy(dst + p * _PAGE, lsrc + lit, length)
                lit += length
            elif k == K_DUP_IN or k == K_DUP_X or k == K_BASELINE:
                if r >= n_ref or length != _PAGE:
                    err = 2
                    bad = p
                    break
                ref = refs[r]
                r += 1
                if k == K_DUP_IN:
                    if ref >= <uint64_t>p:
                        err = 3
                        bad = p
                        break
                    memcpy(dst + p * _PAGE, dst + ref * _PAGE, _PAGE)
            elif k == K_SAME:
                if length != _PAGE:
                    err = 2
                    bad = p
                    break
            elif k == K_DELTA:
                if dl >= n_dl or length != _PAGE or delta_lengths[dl] > n_delta - d:
                    err = 4
                    bad = p
                    break
                if xor_decode_page(dsrc + d, delta_lengths[dl], dst + p * _PAGE, _PAGE):
                    err = 5
                    bad = p
                    break
                d += delta_lengths[dl]
                dl += 1
            else:
                err = 6
                bad = p
                break
    if err:
        reasons = {1: "literal section too short", 2: "reference to a short or missing page",
                   3: "in-chunk reference does not point backwards", 4: "delta section too short",
                   5: "malformed delta stream", 6: "unknown page kind"}
        raise ValueError(f"page {bad}: {reasons[err]}")
    if lit != n_lit or d != n_delta or dl != n_dl or r != n_ref:
        raise ValueError("page map does not consume the payload exactly")


cdef extern from "<unistd.h>" nogil:
    ssize_t pread(int fd, void* buf, size_t count, long offset)

cdef extern from "<errno.h>" nogil:
    int errno
    int EINTR


def fill_from_files(uint8_t[::1] out, Py_ssize_t raw_len, const uint8_t[::1] kinds, const uint64_t[::1] refs,
                    uint64_t page0, int partial_fd, int baseline_fd):
    """Read every page that comes from the receiver's files into `out`, before `assemble`.

    DUP_X (a reference) and DELTA (its own page) read the partial file `partial_fd`; BASELINE (a
    reference) and SAME (its own page) read the baseline file `baseline_fd`. Consecutive pages
    from consecutive file pages are one pread. A fd of -1 means "no such file" and a reference to
    it, like a read past the end of the file, raises ValueError; an I/O error raises OSError.
    Runs without the GIL: a chunk full of references costs one call, not one per page.
    """
    cdef Py_ssize_t pages = (raw_len + _PAGE - 1) // _PAGE
    cdef Py_ssize_t n_ref = refs.shape[0]
    cdef Py_ssize_t p = 0, r = 0, run_start = 0, run_len = 0, done
    cdef int run_fd = -1, fd
    cdef uint64_t src = 0, run_src = 0
    cdef uint8_t k
    cdef ssize_t got
    cdef int err = 0, os_err = 0
    if raw_len < 0 or out.shape[0] < raw_len or kinds.shape[0] != pages:
        raise ValueError("page map does not match the chunk length")
    if raw_len == 0:
        return
    cdef uint8_t* dst = &out[0]
    with nogil:
        while p <= pages and not err:
            fd = -2  # this page does not come from a file
            if p < pages:
                k = kinds[p]
                if k == K_DUP_X or k == K_BASELINE or k == K_DUP_IN:
                    if r >= n_ref:
                        err = 2
                        break
                    src = refs[r]
                    r += 1
                    if k != K_DUP_IN:
                        fd = partial_fd if k == K_DUP_X else baseline_fd
                elif k == K_DELTA or k == K_SAME:
                    src = page0 + <uint64_t>p
                    fd = partial_fd if k == K_DELTA else baseline_fd
                if fd == -1:
                    err = 1
                    break
                if fd >= 0 and (raw_len - p * _PAGE < _PAGE or src > (<uint64_t>1 << 50)):
                    err = 2
                    break
            # extend the current run, or read it and start another
            if run_len and fd == run_fd and src == run_src + <uint64_t>run_len and p == run_start + run_len:
                run_len += 1
                p += 1
                continue
            if run_len:
                done = 0
                while done < run_len * _PAGE:
                    got = pread(run_fd, dst + run_start * _PAGE + done, run_len * _PAGE - done,
                                <long>(run_src * <uint64_t>_PAGE) + done)
                    if got < 0 and errno == EINTR:
                        continue
                    if got < 0:
                        err = 4
                        os_err = errno
                        break
                    if got == 0:
                        err = 3
                        break
                    done += got
                run_len = 0
            if fd >= 0:
                run_fd, run_src, run_start, run_len = fd, src, p, 1
            p += 1
    if err == 4:
        raise OSError(os_err, f"reading a referenced page: errno {os_err}")
    if err:
        reasons = {1: "chunk references a file this receiver does not have",
                   2: "reference to a short, missing or out-of-range page",
                   3: "reference beyond the end of the file"}
        raise ValueError(reasons[err])
