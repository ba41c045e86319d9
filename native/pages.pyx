# cython: language_level=3
"""Page kernels over whole chunks: zero-page scan, 128-bit page hashes, in-chunk dedupe.

Chunks are 4 KiB pages back to back. Every kernel checks buffer sizes once at the boundary,
then runs without the GIL over raw pointers, so a thread pool can scan chunks in parallel.
"""

from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy, memset

from layout cimport PAGE, PAGE_DUP_IN, PAGE_LITERAL, PAGE_ZERO

PAGE_SIZE = PAGE
cdef Py_ssize_t _PAGE = PAGE
cdef Py_ssize_t _WORDS = PAGE // 8


cdef inline bint _page_is_zero(const uint8_t* page) noexcept nogil:
    # OR-reduce eight words at a time; the compiler vectorises the inner loop.
    cdef Py_ssize_t i
    cdef uint64_t acc
    cdef uint64_t w[8]
    for i in range(0, _PAGE, 64):
        memcpy(w, page + i, 64)
        acc = w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7]
        if acc != 0:
            return False
    return True


def zero_page_mask(const uint8_t[::1] chunk, uint8_t[::1] out):
    """Mark zero pages of `chunk` in `out` (1 = all-zero page); return how many are zero.

    `chunk` must hold whole pages except possibly a short last page, which is zero only if
    every byte it has is zero. `out` needs one byte per (possibly partial) page.
    """
    cdef Py_ssize_t n = chunk.shape[0]
    cdef Py_ssize_t pages = (n + _PAGE - 1) // _PAGE
    if out.shape[0] < pages:
        raise ValueError(f"mask buffer holds {out.shape[0]} entries, chunk has {pages} pages")
    cdef Py_ssize_t p, full = n // _PAGE, j, count = 0
    cdef const uint8_t* base
    cdef bint z
    if n == 0:
        return 0
    base = &chunk[0]
    with nogil:
        for p in range(full):
            z = _page_is_zero(base + p * _PAGE)
            out[p] = z
            count += z
        if full < pages:
            z = True
            for j in range(full * _PAGE, n):
                if base[j] != 0:
                    z = False
                    break
            out[full] = z
            count += z
    return count


cdef bint _all_zero(const uint8_t* base, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i, full = n // _PAGE
    for i in range(full):
        if not _page_is_zero(base + i * _PAGE):
            return False
    for i in range(full * _PAGE, n):
        if base[i] != 0:
            return False
    return True


def is_zero(const uint8_t[::1] data):
    """True when every byte of `data` is zero."""
    cdef Py_ssize_t n = data.shape[0]
    cdef bint result
    if n == 0:
        return True
    with nogil:
        result = _all_zero(&data[0], n)
    return result


# ---------------------------------------------------------------------------------------------
# Page hashes: a 128-bit content hash per page, computed in one pass with the zero scan.
#
# The low half is the page *fingerprint* (the key of every lookup table); the high half is the
# independent confirmation a table hit must also match before a page is sent as a reference,
# so a 64-bit fingerprint collision can never make the receiver copy the wrong page.
#
# Construction: eight 64-bit lanes; each 64-byte stripe is keyed by its position, every lane adds
# the 32x32->64 product of its keyed word's halves and the raw word of its neighbour lane (so no
# input bit is lost when a product is zero); the lanes are folded with 64x64->128 multiplies and
# a final avalanche. The inner loop is plain integer arithmetic the compiler vectorises.
# ---------------------------------------------------------------------------------------------

cdef extern from *:
    """
    static inline unsigned long long dwcp_fold_mul(unsigned long long a, unsigned long long b) {
        unsigned __int128 p = (unsigned __int128)a * b;
        return (unsigned long long)p ^ (unsigned long long)(p >> 64);
    }
    """
    uint64_t dwcp_fold_mul(uint64_t a, uint64_t b) noexcept nogil

# The stripe loop of the page hash, in C so it can be compiled once per vector width and picked
# at load time (GCC target_clones): the build targets x86-64-v2 (SSE4.2), which keeps two of
# the eight lanes in a register; AVX2 keeps four and AVX-512 all eight. Same arithmetic, same
# hashes on every CPU.
cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
    __attribute__((target_clones("avx512f", "avx2", "default")))
    #endif
    static void dwcp_stripes(uint64_t* restrict acc, const uint8_t* restrict src, size_t stripes,
                             uint64_t first, const uint64_t* restrict key, uint64_t step) {
        uint64_t a[8];
        memcpy(a, acc, sizeof a);
        for (size_t s = 0; s < stripes; s++) {
            uint64_t w[8], pos = (first + s) * step;
            memcpy(w, src + 64 * s, 64);
            for (int i = 0; i < 8; i += 2) {
                uint64_t k0 = w[i] ^ (key[i] + pos), k1 = w[i + 1] ^ (key[i + 1] + pos);
                a[i] += (uint64_t)(uint32_t)k0 * (k0 >> 32) + w[i + 1];
                a[i + 1] += (uint64_t)(uint32_t)k1 * (k1 >> 32) + w[i];
            }
        }
        memcpy(acc, a, sizeof a);
    }
    """
    void dwcp_stripes(uint64_t* acc, const uint8_t* src, size_t stripes, uint64_t first, const uint64_t* key,
                      uint64_t step) noexcept nogil

# The same stripe loop in AVX-512 intrinsics: one stripe is one register (eight lanes), and the
# neighbour-lane swap one in-lane shuffle. GCC's vectorisation of the C loop above keeps the
# lanes in memory-shaped pieces (measured: 11 GB/s a chunk of random pages); this runs at the
# speed of libxxhash's XXH3, whose accumulate step has the same shape. Picked at run time when
# the CPU has AVX-512F; the hashes are the C loop's, bit for bit (test_native_pages).
cdef extern from *:
    """
    #if defined(__GNUC__) && defined(__x86_64__)
    #include <immintrin.h>
    __attribute__((target("avx512f")))
    static void dwcp_stripes_avx512(uint64_t* restrict acc, const uint8_t* restrict src, size_t stripes,
                                    uint64_t first, const uint64_t* restrict key, uint64_t step) {
        __m512i a = _mm512_loadu_si512((const void*)acc);
        const __m512i k = _mm512_loadu_si512((const void*)key);
        const __m512i advance = _mm512_set1_epi64((long long)step);
        __m512i pos = _mm512_set1_epi64((long long)(first * step));
        size_t s = 0;
        /* Two stripes a round into two sums: the adds of one do not wait for the other. */
        const __m512i advance2 = _mm512_add_epi64(advance, advance);
        __m512i b = _mm512_setzero_si512();
        __m512i pos1 = _mm512_add_epi64(pos, advance);
        for (; s + 2 <= stripes; s += 2) {
            __m512i w0 = _mm512_loadu_si512((const void*)(src + 64 * s));
            __m512i w1 = _mm512_loadu_si512((const void*)(src + 64 * s + 64));
            __m512i k0 = _mm512_xor_si512(w0, _mm512_add_epi64(k, pos));
            __m512i k1 = _mm512_xor_si512(w1, _mm512_add_epi64(k, pos1));
            a = _mm512_add_epi64(a, _mm512_add_epi64(_mm512_mul_epu32(k0, _mm512_srli_epi64(k0, 32)),
                                                     _mm512_shuffle_epi32(w0, _MM_PERM_BADC)));
            b = _mm512_add_epi64(b, _mm512_add_epi64(_mm512_mul_epu32(k1, _mm512_srli_epi64(k1, 32)),
                                                     _mm512_shuffle_epi32(w1, _MM_PERM_BADC)));
            pos = _mm512_add_epi64(pos, advance2);
            pos1 = _mm512_add_epi64(pos1, advance2);
        }
        a = _mm512_add_epi64(a, b);
        for (; s < stripes; s++) {
            __m512i w = _mm512_loadu_si512((const void*)(src + 64 * s));
            __m512i kw = _mm512_xor_si512(w, _mm512_add_epi64(k, pos));
            __m512i product = _mm512_mul_epu32(kw, _mm512_srli_epi64(kw, 32));
            __m512i neighbour = _mm512_shuffle_epi32(w, _MM_PERM_BADC);
            a = _mm512_add_epi64(a, _mm512_add_epi64(product, neighbour));
            pos = _mm512_add_epi64(pos, advance);
        }
        _mm512_storeu_si512((void*)acc, a);
    }
    static int dwcp_have_avx512 = -1;
    static void dwcp_stripes_best(uint64_t* acc, const uint8_t* src, size_t stripes, uint64_t first,
                                  const uint64_t* key, uint64_t step) {
        if (dwcp_have_avx512 < 0) {
            __builtin_cpu_init();
            dwcp_have_avx512 = __builtin_cpu_supports("avx512f") ? 1 : 0;
        }
        if (dwcp_have_avx512)
            dwcp_stripes_avx512(acc, src, stripes, first, key, step);
        else
            dwcp_stripes(acc, src, stripes, first, key, step);
    }
    #else
    static int dwcp_have_avx512 = 0;
    #define dwcp_stripes_best dwcp_stripes
    #endif
    """
    void dwcp_stripes_best(uint64_t* acc, const uint8_t* src, size_t stripes, uint64_t first, const uint64_t* key,
                           uint64_t step) noexcept nogil
    int dwcp_have_avx512

cdef uint64_t[8] _SEED = [
    0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
    0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x27D4EB2F165667C5, 0x94D049BB133111EB,
]
cdef uint64_t[8] _KEY = [
    0xBE4BA423396CFEB8, 0x1CAD21F72C81017C, 0xDB979083E96DD4DE, 0x1F67B3B7A4A44072,
    0x78E5C0CC4EE679CB, 0x2172FFCC7DD05A82, 0x8E2443F7744608B8, 0x4C263A81E69035E0,
]
cdef uint64_t _STEP = 0xA0761D6478BD642F
cdef uint64_t _FIN_LO = 0xE7037ED1A0B428DB
cdef uint64_t _FIN_HI = 0x8EBC6AF09C88C6E3
cdef uint64_t _MIX1 = 0xFF51AFD7ED558CCD
cdef uint64_t _MIX2 = 0xC4CEB9FE1A85EC53

def use_portable_stripes(bint portable):
    """Test hook: hash with the portable C stripe loop even on an AVX-512 CPU (or go back to the
    best the CPU has); return whether the portable loop was in use. Both give the same hashes."""
    global dwcp_have_avx512
    was = dwcp_have_avx512 == 0
    dwcp_have_avx512 = 0 if portable else -1
    return was


# Test hook: the fingerprint (low half) is ANDed with this mask. Setting it to 0 forces every
# page to share one fingerprint, which is how tests prove a collision is caught and not trusted.
cdef uint64_t _fp_mask = 0xFFFFFFFFFFFFFFFF


def set_fingerprint_mask(uint64_t mask):
    """Test hook: AND every fingerprint with `mask` (0 forces collisions); return the old mask."""
    global _fp_mask
    old = _fp_mask
    _fp_mask = mask
    return old


cdef inline uint64_t _avalanche(uint64_t h) noexcept nogil:
    h ^= h >> 33
    h *= _MIX1
    h ^= h >> 29
    h *= _MIX2
    h ^= h >> 32
    return h


cdef void hash_bytes(const uint8_t* src, Py_ssize_t n, uint64_t* out_lo, uint64_t* out_hi) noexcept nogil:
    """128-bit hash of n bytes (any length; pages are the hot case)."""
    cdef uint64_t acc[8]
    cdef uint8_t last[64]
    cdef Py_ssize_t s, stripes = n // 64, rest = n - (n // 64) * 64
    cdef uint64_t lo, hi
    cdef int i
    for i in range(8):
        acc[i] = _SEED[i]
    dwcp_stripes_best(acc, src, stripes, 0, _KEY, _STEP)
    if rest:
        memset(last, 0, 64)
        memcpy(last, src + stripes * 64, rest)
        dwcp_stripes_best(acc, last, 1, stripes, _KEY, _STEP)
    lo = <uint64_t>n * _FIN_LO
    hi = <uint64_t>n * _FIN_HI + 1
    for i in range(4):
        lo += dwcp_fold_mul(acc[2 * i] ^ _KEY[2 * i + 1], acc[2 * i + 1] ^ _FIN_LO)
        hi += dwcp_fold_mul(acc[i] ^ _FIN_HI, acc[i + 4] ^ _KEY[i])
    out_lo[0] = _avalanche(lo) & _fp_mask
    out_hi[0] = _avalanche(hi ^ (lo >> 7))


def page_hashes(const uint8_t[::1] chunk, uint8_t[::1] zero_out, uint64_t[:, ::1] hash_out):
    """Zero scan and 128-bit hash of every page of `chunk` in one pass; return the zero count.

    `zero_out[p]` is 1 for an all-zero page (whose hash is left 0, zero pages are never looked
    up); `hash_out[p, 0]` is the fingerprint, `hash_out[p, 1]` the confirmation half. A short
    last page is hashed over the bytes it has.
    """
    cdef Py_ssize_t n = chunk.shape[0]
    cdef Py_ssize_t pages = (n + _PAGE - 1) // _PAGE
    if zero_out.shape[0] < pages or hash_out.shape[0] < pages or hash_out.shape[1] != 2:
        raise ValueError(f"outputs too small for {pages} pages")
    cdef Py_ssize_t p, length, count = 0
    cdef const uint8_t* base
    cdef const uint8_t* page
    cdef bint z
    if n == 0:
        return 0
    base = &chunk[0]
    with nogil:
        for p in range(pages):
            page = base + p * _PAGE
            length = min(_PAGE, n - p * _PAGE)
            if length == _PAGE:
                z = _page_is_zero(page)
            else:
                z = _all_zero(page, length)
            zero_out[p] = z
            count += z
            if z:
                hash_out[p, 0] = 0
                hash_out[p, 1] = 0
            else:
                hash_bytes(page, length, &hash_out[p, 0], &hash_out[p, 1])
    return count


def gather_literals(const uint8_t[::1] chunk, const uint8_t[::1] kinds, uint8_t[::1] out):
    """Copy the literal pages of `chunk` (kinds[p] == LITERAL), in order, to the start of `out`;
    return the bytes written. Consecutive literal pages go in one copy; a short last page is
    copied as long as it is. This is the page-map body's literal section, gathered for a codec
    that needs its input in one buffer."""
    cdef Py_ssize_t n = chunk.shape[0]
    cdef Py_ssize_t pages = (n + _PAGE - 1) // _PAGE
    if kinds.shape[0] < pages:
        raise ValueError(f"kinds has {kinds.shape[0]} entries, chunk has {pages} pages")
    cdef Py_ssize_t p, first, total = 0, at = 0, start, end
    for p in range(pages):
        if kinds[p] == _LITERAL:
            total += min(_PAGE, n - p * _PAGE)
    if out.shape[0] < total:
        raise ValueError(f"output of {out.shape[0]} bytes cannot hold {total} literal bytes")
    if total == 0:
        return 0
    cdef const uint8_t* base = &chunk[0]
    cdef uint8_t* dst = &out[0]
    with nogil:
        p = 0
        while p < pages:
            if kinds[p] != _LITERAL:
                p += 1
                continue
            first = p
            while p < pages and kinds[p] == _LITERAL:
                p += 1
            start = first * _PAGE
            end = min(p * _PAGE, n)
            memcpy(dst + at, base + start, end - start)
            at += end - start
    return at


def hash128(const uint8_t[::1] data):
    """(fingerprint, confirmation) of `data`: the page hash for one buffer, for tests and tools."""
    cdef uint64_t lo = 0, hi = 0
    cdef Py_ssize_t n = data.shape[0]
    cdef uint8_t empty = 0
    with nogil:
        hash_bytes(&data[0] if n else &empty, n, &lo, &hi)
    return lo, hi


# Page kinds of the chunk page map (mirrored in dwcp_agent/hde/layout.py).
KIND_LITERAL = PAGE_LITERAL
KIND_ZERO = PAGE_ZERO
KIND_DUP_IN = PAGE_DUP_IN
cdef uint8_t _LITERAL = PAGE_LITERAL, _ZERO = PAGE_ZERO, _DUP_IN = PAGE_DUP_IN


def dedupe_in_chunk(const uint8_t[::1] chunk, const uint8_t[::1] zero, const uint64_t[:, ::1] hashes,
                    uint8_t[::1] kinds, uint64_t[::1] refs):
    """Classify pages as zero, duplicate of an earlier page of this chunk, or literal.

    A fingerprint hit is confirmed byte for byte before the page becomes a reference (the first
    page holding a fingerprint wins; a colliding page with other content stays literal). Only
    full pages are deduplicated. Returns the number of duplicate pages.
    """
    cdef Py_ssize_t n = chunk.shape[0]
    cdef Py_ssize_t pages = (n + _PAGE - 1) // _PAGE
    cdef Py_ssize_t full = n // _PAGE
    if (zero.shape[0] < pages or hashes.shape[0] < pages or hashes.shape[1] != 2
            or kinds.shape[0] < pages or refs.shape[0] < pages):
        raise ValueError(f"buffers too small for {pages} pages")
    cdef Py_ssize_t cap = 16, mask, p, slot, q, dups = 0
    while cap < 2 * pages:
        cap *= 2
    mask = cap - 1
    cdef int64_t* table = <int64_t*>malloc(cap * sizeof(int64_t))
    if table == NULL:
        raise MemoryError()
    cdef const uint8_t* base = &chunk[0] if n else NULL
    with nogil:
        for p in range(cap):
            table[p] = -1
        for p in range(pages):
            refs[p] = 0
            if zero[p]:
                kinds[p] = _ZERO
                continue
            kinds[p] = _LITERAL
            if p >= full:
                continue
            slot = <Py_ssize_t>(hashes[p, 0] & <uint64_t>mask)
            while table[slot] >= 0 and hashes[table[slot], 0] != hashes[p, 0]:
                slot = (slot + 1) & mask
            q = table[slot]
            if q < 0:
                table[slot] = p
            elif memcmp(base + q * _PAGE, base + p * _PAGE, _PAGE) == 0:
                kinds[p] = _DUP_IN
                refs[p] = q
                dups += 1
        free(table)
    return dups
