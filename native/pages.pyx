# cython: language_level=3
"""Page kernels over whole chunks: zero-page scan.

Chunks are 4 KiB pages back to back. Every kernel checks buffer sizes once at the boundary,
then runs without the GIL over raw pointers, so a thread pool can scan chunks in parallel.
"""

from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcpy

PAGE_SIZE = 4096
cdef Py_ssize_t _PAGE = 4096
cdef Py_ssize_t _WORDS = 4096 // 8


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
