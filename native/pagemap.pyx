# cython: language_level=3
"""The destination's page-map chunk writer: verify and write a FLAG_PAGE_MAP chunk without building it.

The Python decoder (hde/chunk.py `_decode_page_map` + delta.fill_from_files + delta.assemble)
rebuilds the whole chunk in a buffer (a copy of every literal and duplicate page, a memset of
every zero page), hashes it, then copies it again into the page cache. `PageMapWriter` takes
the decoded page-map body instead and, without the GIL:
  1. (prepare) applies every check of `_decode_page_map`, `fill_from_files` and `assemble` (same messages,
     raised as ValueError for the caller to report as CodecError);
  2. (prepare) points each page at where its bytes already are: the literal section, an earlier page of the
     chunk (DUP_IN), a static zero page, or `scratch` for pages read from the receiver's files
     (DUP_X, BASELINE, SAME: one pread each, before anything is written);
  3. (verify) hashes the chunk page by page (xxh3-64, streaming: the same value as over the
     built chunk); on a mismatch the chunk is forgotten and cannot be written;
  4. (write) writes each run of pages with one pwritev from those places. With `holes` (the file reads
     as zeros there) ZERO pages are skipped, and with `punch` punched, as write_except_zero_pages
     does; without, they are written as zeros.
DELTA pages (an XOR against the acknowledged page) are left to the Python decoder: prepare
returns UNSUPPORTED before reading anything.
"""

from libc.stdint cimport uint8_t, uint16_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset
from posix.types cimport off_t

from layout cimport PAGE


cdef extern from "<sys/types.h>":
    ctypedef long ssize_t


cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void* iov_base
        size_t iov_len
    ssize_t pwritev(int fd, const iovec* iov, int iovcnt, off_t offset)


cdef extern from "<unistd.h>" nogil:
    ssize_t pread(int fd, void* buf, size_t count, off_t offset)


cdef extern from "<fcntl.h>" nogil:
    int fallocate(int fd, int mode, off_t offset, off_t length)
    int FALLOC_FL_KEEP_SIZE
    int FALLOC_FL_PUNCH_HOLE


cdef extern from "<errno.h>" nogil:
    int errno
    int EINTR


from xxh3 cimport *  # XXH3_64bits, XXH3_state_t and the streaming calls


PAGE_SIZE = PAGE

cdef enum:
    _DONE = 0
    _UNSUPPORTED = 2
    _R_UNSUPPORTED = 102  # _point_pages' codes above the _REASONS keys
    _IOV = 256            # iovecs per pwritev (IOV_MAX is 1024)
    _K_LITERAL = 0
    _K_ZERO = 1
    _K_DUP_IN = 2
    _K_DUP_X = 3
    _K_BASELINE = 4
    _K_SAME = 5
    _K_DELTA = 6
    _N_KINDS = 7

DONE = _DONE                # the map is checked and every page points at its bytes
UNSUPPORTED = _UNSUPPORTED  # a DELTA page: nothing read or written, decode it in Python
cdef uint64_t _MAX_PAGE_INDEX = (<uint64_t>1) << 50
cdef uint8_t _ZEROS[PAGE]
memset(_ZEROS, 0, PAGE)

_REASONS = {
    1: "unknown page kind in the page map",
    2: "a short last page can only be literal or zero",
    3: "page map announces more references than the body holds",
    4: "page-map sections do not add up to the body length",
    5: "page reference out of range",
    6: "page map: chunk references a file this receiver does not have",
    7: "page map: reference to a short, missing or out-of-range page",
    8: "page map: reference beyond the end of the file",
    9: "page map: in-chunk reference does not point backwards",
}


cdef inline uint64_t _u64(const uint8_t* p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)  # little-endian host, as the wire
    return v


cdef int _read_page(int fd, uint8_t* dst, uint64_t page) noexcept nogil:
    """0, 8 (end of file) or -1 (errno set)."""
    cdef Py_ssize_t done = 0
    cdef ssize_t got
    while done < PAGE:
        got = pread(fd, dst + done, PAGE - done, <off_t>(page * PAGE + done))
        if got < 0:
            if errno == EINTR:
                continue
            return -1
        if got == 0:
            return 8
        done += got
    return 0


cdef int _pwritev_all(int fd, iovec* iov, int count, uint64_t offset) noexcept nogil:
    """Write every byte of iov[:count] at `offset` (iov is consumed); 0 or -1 with errno set."""
    cdef ssize_t k
    cdef int i = 0
    while i < count:
        k = pwritev(fd, iov + i, count - i, <off_t>offset)
        if k < 0:
            if errno == EINTR:
                continue
            return -1
        offset += <uint64_t>k
        while i < count and <size_t>k >= iov[i].iov_len:
            k -= iov[i].iov_len
            i += 1
        if i < count and k:
            iov[i].iov_base = <uint8_t*>iov[i].iov_base + k
            iov[i].iov_len -= k
    return 0


cdef int _punch(int fd, uint64_t offset, Py_ssize_t n) noexcept nogil:
    while fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, <off_t>offset, <off_t>n):
        if errno != EINTR:
            return -1
    return 0


cdef int _write_runs(int fd, const uint8_t** src, Py_ssize_t pages, Py_ssize_t raw_len, const uint8_t* kinds,
                     uint64_t offset, bint holes, bint punch) noexcept nogil:
    """pwritev each run of pages to write; skip (and maybe punch) ZERO pages when `holes`.
    0 or -1 with errno set."""
    cdef iovec iov[_IOV]
    cdef int n = 0
    cdef Py_ssize_t p = 0, start, run_start = 0, length
    cdef bint skip
    while p < pages:
        skip = holes and kinds[p] == _K_ZERO
        if skip:
            start = p
            while p < pages and kinds[p] == _K_ZERO:
                p += 1
            if punch and _punch(fd, offset + start * PAGE, min(p * PAGE, raw_len) - start * PAGE):
                return -1
            continue
        run_start = p
        n = 0
        while p < pages and not (holes and kinds[p] == _K_ZERO):
            length = min(<Py_ssize_t>PAGE, raw_len - p * PAGE)
            if n and <const uint8_t*>iov[n - 1].iov_base + iov[n - 1].iov_len == src[p]:
                iov[n - 1].iov_len += length
            else:
                if n == _IOV:
                    if _pwritev_all(fd, iov, n, offset + run_start * PAGE):
                        return -1
                    run_start = p
                    n = 0
                iov[n].iov_base = <void*>src[p]
                iov[n].iov_len = length
                n += 1
            p += 1
        if n and _pwritev_all(fd, iov, n, offset + run_start * PAGE):
            return -1
    return 0


cdef int _point_pages(const uint8_t* body, Py_ssize_t body_len, Py_ssize_t raw_len, uint64_t page0,
                      uint8_t* scratch, int partial_fd, int baseline_fd, const uint8_t** src,
                      int* os_err) noexcept nogil:
    """Check the page map and set src[p] for every page (reading file pages into scratch).
    0, _R_UNSUPPORTED, a _REASONS key, or -1 (I/O error in os_err)."""
    cdef Py_ssize_t pages = (raw_len + PAGE - 1) // PAGE
    cdef Py_ssize_t full = raw_len // PAGE
    cdef Py_ssize_t p, n_ref = 0, n_delta = 0, n_lit = 0, pos, lit, r = 0
    cdef Py_ssize_t literal_len
    cdef const uint8_t* kinds = body
    cdef uint8_t k
    cdef uint64_t ref, page
    cdef int fd, rc
    for p in range(pages):
        k = kinds[p]
        if k >= _N_KINDS:
            return 1
        if k == _K_DUP_IN or k == _K_DUP_X or k == _K_BASELINE:
            n_ref += 1
        elif k == _K_DELTA:
            n_delta += 1
        elif k == _K_LITERAL:
            n_lit += 1
    if full < pages and kinds[full] != _K_LITERAL and kinds[full] != _K_ZERO:
        return 2
    pos = pages
    if pos + 8 * n_ref + 2 * n_delta > body_len:
        return 3
    if n_delta:
        return _R_UNSUPPORTED
    literal_len = n_lit * PAGE
    if full < pages and kinds[full] == _K_LITERAL:
        literal_len -= PAGE - (raw_len - full * PAGE)
    if pos + 8 * n_ref + literal_len != body_len:
        return 4
    for r in range(n_ref):
        if _u64(body + pos + 8 * r) >= _MAX_PAGE_INDEX:
            return 5
    lit = pos + 8 * n_ref
    r = 0
    for p in range(pages):
        k = kinds[p]
        if k == _K_ZERO:
            src[p] = _ZEROS
        elif k == _K_LITERAL:
            src[p] = body + lit
            lit += min(<Py_ssize_t>PAGE, raw_len - p * PAGE)
        elif k == _K_DUP_IN:
            ref = _u64(body + pos + 8 * r)
            r += 1
            if raw_len - p * PAGE < PAGE:
                return 7
            if ref >= <uint64_t>p:
                return 9
            src[p] = src[ref]
        else:  # DUP_X, BASELINE (a reference) or SAME (this page): from a file, before any write
            if k == _K_SAME:
                page = page0 + <uint64_t>p
            else:
                page = _u64(body + pos + 8 * r)
                r += 1
            fd = partial_fd if k == _K_DUP_X else baseline_fd
            if fd < 0:
                return 6
            if raw_len - p * PAGE < PAGE:
                return 7
            rc = _read_page(fd, scratch + p * PAGE, page)
            if rc < 0:
                os_err[0] = errno
                return -1
            if rc:
                return rc
            src[p] = scratch + p * PAGE
    return 0


cdef class PageMapWriter:
    """One stream's page-map writer, in three steps so that the receiver can time the decode
    apart from the checksum and the write, as it does for chunks the decoder builds:
      prepare(...)  check the map and point every page at its bytes (the decode);
      verify(sum)   hash the chunk from those places (True when it matches);
      write(...)    write it, only after verify returned True for this chunk.
    The page-pointer array and the XXH3 state are this stream's scratch, allocated once. Between
    prepare and write the writer holds the body and scratch buffers its pointers point into."""

    cdef const uint8_t** _src
    cdef XXH3_state_t* _state
    cdef Py_ssize_t _max_pages
    cdef Py_ssize_t _raw_len
    cdef const uint8_t[::1] _body
    cdef uint8_t[::1] _scratch
    cdef bint _prepared
    cdef bint _verified

    def __cinit__(self, Py_ssize_t max_raw_len):
        if max_raw_len <= 0:
            raise ValueError("a page-map writer needs a positive chunk size")
        self._max_pages = (max_raw_len + PAGE - 1) // PAGE
        self._src = <const uint8_t**>malloc(sizeof(uint8_t*) * self._max_pages)
        self._state = XXH3_createState()
        if self._src == NULL or self._state == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self._src)
        if self._state != NULL:
            XXH3_freeState(self._state)

    cdef void _forget(self):
        self._prepared = self._verified = False
        self._body = None
        self._scratch = None

    def prepare(self, const uint8_t[::1] body, Py_ssize_t raw_len, uint64_t page0, uint8_t[::1] scratch,
                int partial_fd, int baseline_fd):
        """Check the map a decoded page-map `body` describes and point each page at its bytes.
        DONE, or UNSUPPORTED (DELTA pages: nothing read). A malformed map raises ValueError, an
        I/O error OSError.

        The caller has checked the page-map header (body length and bounds, page0) as
        hde.chunk._decode_page_map does. `scratch` receives the pages read from the files (DUP_X
        from `partial_fd`, BASELINE and SAME from `baseline_fd`; -1 for no such file)."""
        cdef Py_ssize_t pages = (raw_len + PAGE - 1) // PAGE
        cdef Py_ssize_t body_len = body.shape[0]
        cdef int rc = 0, os_err = 0
        self._forget()
        if raw_len <= 0 or pages > self._max_pages or scratch.shape[0] < raw_len or body_len < pages:
            raise ValueError("page map does not match the chunk length")
        with nogil:
            rc = _point_pages(&body[0], body_len, raw_len, page0, &scratch[0], partial_fd, baseline_fd, self._src,
                              &os_err)
        if rc == _R_UNSUPPORTED:
            return _UNSUPPORTED
        if rc == -1:
            raise OSError(os_err, f"page-map chunk: reading a referenced page: errno {os_err}")
        if rc:
            raise ValueError(_REASONS[rc])
        self._body = body
        self._scratch = scratch
        self._raw_len = raw_len
        self._prepared = True
        return _DONE

    def verify(self, uint64_t expected):
        """Whether the prepared chunk's xxh3-64 is `expected` (the same value as over the built
        chunk); only then may it be written."""
        cdef Py_ssize_t pages = (self._raw_len + PAGE - 1) // PAGE, p, length
        cdef const uint8_t* run_start = NULL
        cdef const uint8_t* run_end = NULL
        cdef const uint8_t** src = self._src
        cdef uint64_t digest
        if not self._prepared:
            raise ValueError("no page-map chunk prepared")
        with nogil:
            XXH3_64bits_reset(self._state)
            for p in range(pages):  # contiguous pages (runs of literals) hashed in one update
                length = min(<Py_ssize_t>PAGE, self._raw_len - p * PAGE)
                if src[p] != run_end:
                    if run_end != NULL:
                        XXH3_64bits_update(self._state, run_start, run_end - run_start)
                    run_start = src[p]
                run_end = src[p] + length
            XXH3_64bits_update(self._state, run_start, run_end - run_start)
            digest = XXH3_64bits_digest(self._state)
        self._verified = digest == expected
        if not self._verified:
            self._forget()
        return self._verified

    def write(self, int fd, uint64_t offset, bint holes=True, bint punch=False):
        """Write the verified chunk at `offset` of `fd` with one pwritev per run of pages. With
        `holes` (the file reads as zeros there) ZERO pages are skipped, and with `punch` punched;
        without, they are written as zeros. OSError on an I/O error."""
        cdef int rc, os_err = 0
        if not self._verified:
            self._forget()
            raise ValueError("a page-map chunk is written only after its checksum matched")
        try:
            with nogil:
                rc = _write_runs(fd, self._src, (self._raw_len + PAGE - 1) // PAGE, self._raw_len, &self._body[0],
                                 offset, holes, punch)
                if rc:
                    os_err = errno
        finally:
            self._forget()
        if rc:
            raise OSError(os_err, f"page-map chunk at {offset}: errno {os_err}")
