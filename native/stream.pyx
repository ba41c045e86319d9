# cython: language_level=3
"""Receive loop of one TCP data stream for raw DATA frames, without the GIL.

`RawFrameReceiver.next_frame` does, for one frame, what the Python receive loop does for a chunk
sent as is (codec none, no flags): send the pending ACK, read the 56-byte header, check it (magic,
CRC, type, version, session, stream, sequence, offset, lengths), read the payload, verify its
xxh3-64 and write it at its offset. Any frame it does not handle completely (a frame to decode,
or one that fails a check) is handed back to the caller, header still in `header`, payload not
read, so the Python path applies the same checks and raises the same errors; only a checksum
mismatch is reported after the payload has been read. Header layout: dwcp_agent/wire.py.

Sealed streams (dwcp_agent/security/sealed.py) take the same loop: `FrameCipher` is one direction's
AES-128-GCM key and nonce counter (intel-ipsec-mb: VAES/AVX-512 where the CPU has them, about
twice the speed of the system OpenSSL 3.0 here; key schedule once per key, no GIL held), with
the wire format and nonce rules of sealed.FrameKey, the Python reference it is tested against.
The receiver opens the header, then reads, decrypts in place and hashes the payload in L2-sized
pieces, and writes the chunk only once its tag has been checked; `send_sealed_frame` seals a
frame's header and scatter-gather payload piece by piece into a small staging buffer and sends it.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from libc.errno cimport EAGAIN, EINTR, ETIMEDOUT, errno
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset
from posix.types cimport off_t


cdef extern from "<sys/types.h>":
    ctypedef long ssize_t


cdef extern from "<sys/socket.h>" nogil:
    ssize_t recv(int fd, void* buf, size_t n, int flags)
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    int MSG_NOSIGNAL


cdef extern from "<unistd.h>" nogil:
    ssize_t pwrite(int fd, const void* buf, size_t n, off_t offset)


cdef extern from "<fcntl.h>" nogil:
    int fallocate(int fd, int mode, off_t offset, off_t length)
    int FALLOC_FL_KEEP_SIZE
    int FALLOC_FL_PUNCH_HOLE


cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd* fds, unsigned long nfds, int timeout)
    short POLLIN, POLLOUT


cdef extern from "<intel-ipsec-mb.h>" nogil:
    ctypedef struct IMB_MGR:
        pass
    ctypedef int IMB_ARCH
    struct gcm_key_data:
        pass
    struct gcm_context_data:
        pass
    IMB_MGR* alloc_mb_mgr(uint64_t flags)
    void init_mb_mgr_auto(IMB_MGR* state, IMB_ARCH* arch)
    void IMB_AES128_GCM_PRE(IMB_MGR* mgr, const void* key, gcm_key_data* exp_key)
    void IMB_AES128_GCM_INIT(IMB_MGR* mgr, const gcm_key_data* exp_key, gcm_context_data* ctx, const uint8_t* iv,
                             const uint8_t* aad, uint64_t aad_len)
    void IMB_AES128_GCM_ENC_UPDATE(IMB_MGR* mgr, const gcm_key_data* exp_key, gcm_context_data* ctx, uint8_t* dst,
                                   const uint8_t* src, uint64_t n)
    void IMB_AES128_GCM_DEC_UPDATE(IMB_MGR* mgr, const gcm_key_data* exp_key, gcm_context_data* ctx, uint8_t* dst,
                                   const uint8_t* src, uint64_t n)
    void IMB_AES128_GCM_ENC_FINALIZE(IMB_MGR* mgr, const gcm_key_data* exp_key, gcm_context_data* ctx,
                                     uint8_t* tag, uint64_t tag_len)
    void IMB_AES128_GCM_DEC_FINALIZE(IMB_MGR* mgr, const gcm_key_data* exp_key, gcm_context_data* ctx,
                                     uint8_t* tag, uint64_t tag_len)


cdef extern from "<stdlib.h>" nogil:
    void* aligned_alloc(size_t alignment, size_t size)


from xxh3 cimport *  # XXH3_64bits, XXH3_state_t and the streaming calls


cdef enum Outcome:
    _WRITTEN = 0    # frame verified and written; its fields are in the receiver's attributes
    _HEADER = 1     # a header the caller must handle: payload not read
    _CHECKSUM = 2   # payload read, its xxh3-64 does not match the header
    _CLOSED = 3     # the peer closed (or the stream was shut down); `partial` says mid-frame
    _OS_ERROR = 4   # a system call failed; `error` holds errno
    _TAG = 5        # sealed stream: a header or payload failed its AES-GCM tag check
    _PAYLOAD = 6    # recv_payload: the payload of a handed-back header is read (and opened)

# Outcomes of next_frame (mirrored in dwcp_agent/_native/stream.pyi).
WRITTEN = _WRITTEN
HEADER = _HEADER
CHECKSUM = _CHECKSUM
CLOSED = _CLOSED
OS_ERROR = _OS_ERROR
TAG = _TAG
PAYLOAD = _PAYLOAD

from layout cimport CRC_SPAN, FRAME_ACK, FRAME_DATA, HEADER_LEN, MAGIC, PAGE

HEADER_SIZE = HEADER_LEN
HEADER_CRC_SPAN = CRC_SPAN
FRAME_MAGIC = MAGIC
DATA_FRAME = FRAME_DATA
ACK_FRAME = FRAME_ACK
PAGE_SIZE = PAGE
cdef uint32_t _MAGIC = MAGIC
cdef Py_ssize_t _HEADER_LEN = HEADER_LEN
cdef Py_ssize_t _CRC_SPAN = CRC_SPAN
cdef uint8_t _DATA = FRAME_DATA, _ACK = FRAME_ACK

cdef uint32_t _CRC_TABLE[256]


cdef void _init_crc_table() noexcept:
    cdef uint32_t c, k
    cdef int n
    for n in range(256):
        c = n
        for k in range(8):
            c = (0xEDB88320U ^ (c >> 1)) if c & 1 else (c >> 1)
        _CRC_TABLE[n] = c


_init_crc_table()


cdef inline uint32_t _crc32(const uint8_t* data, Py_ssize_t n) noexcept nogil:
    """zlib.crc32 (IEEE, reflected) of `data`."""
    cdef uint32_t c = 0xFFFFFFFFU
    cdef Py_ssize_t i
    for i in range(n):
        c = _CRC_TABLE[(c ^ data[i]) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFFU


def crc32(const uint8_t[::1] data):
    """CRC-32 as zlib computes it (for tests)."""
    cdef uint8_t empty = 0
    return _crc32(&data[0] if data.shape[0] else &empty, data.shape[0])


cdef inline uint64_t _le(const uint8_t* p, int n) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(n - 1, -1, -1):
        v = (v << 8) | p[i]
    return v


cdef inline void _put(uint8_t* p, uint64_t v, int n) noexcept nogil:
    cdef int i
    for i in range(n):
        p[i] = v & 0xFF
        v >>= 8


cdef int _recv_all(int fd, uint8_t* buf, Py_ssize_t n, Py_ssize_t* got) noexcept nogil:
    """0 when `n` bytes arrived, _CLOSED on end of stream, _OS_ERROR (errno set) otherwise."""
    cdef ssize_t k
    got[0] = 0
    while got[0] < n:
        k = recv(fd, buf + got[0], n - got[0], 0)
        if k > 0:
            got[0] += k
        elif k == 0:
            return _CLOSED
        elif errno != EINTR:
            return _OS_ERROR
    return 0


cdef int _send_all(int fd, const uint8_t* buf, Py_ssize_t n) noexcept nogil:
    cdef ssize_t k
    cdef Py_ssize_t done = 0
    while done < n:
        k = send(fd, buf + done, n - done, MSG_NOSIGNAL)
        if k >= 0:
            done += k
        elif errno != EINTR:
            return _OS_ERROR
    return 0


cdef int _pwrite_all(int fd, const uint8_t* buf, Py_ssize_t n, uint64_t offset) noexcept nogil:
    cdef ssize_t k
    cdef Py_ssize_t done = 0
    while done < n:
        k = pwrite(fd, buf + done, n - done, <off_t>(offset + done))
        if k >= 0:
            done += k
        elif errno != EINTR:
            return _OS_ERROR
    return 0


cdef int _punch(int fd, uint64_t offset, Py_ssize_t n) noexcept nogil:
    while fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, <off_t>offset, <off_t>n):
        if errno != EINTR:
            return _OS_ERROR
    return 0


def write_except_zero_pages(int fd, const uint8_t[::1] data, const uint8_t[::1] zero, uint64_t offset,
                            bint punch=False):
    """pwrite `data` at `offset` except its pages marked in `zero` (1 = all-zero page), one write
    per run of the others, without the GIL. For a file whose unwritten ranges read as zeros (a
    fresh sparse file): the zero pages stay holes, costing neither a copy nor space. With `punch`,
    each run of zero pages is punched (a partial whose ranges were preallocated on tmpfs)."""
    cdef Py_ssize_t n = data.shape[0]
    cdef Py_ssize_t pages = (n + PAGE - 1) // PAGE
    cdef Py_ssize_t p = 0, start
    cdef int rc = 0
    if zero.shape[0] < pages:
        raise ValueError(f"zero-page mask has {zero.shape[0]} entries, data has {pages} pages")
    if n == 0:
        return
    with nogil:
        while p < pages and not rc:
            if zero[p]:
                start = p
                while p < pages and zero[p]:
                    p += 1
                if punch:
                    rc = _punch(fd, offset + start * PAGE, min(p * PAGE, n) - start * PAGE)
                continue
            start = p
            while p < pages and not zero[p]:
                p += 1
            rc = _pwrite_all(fd, &data[start * PAGE], min(p * PAGE, n) - start * PAGE, offset + start * PAGE)
    if rc:
        raise OSError(errno, f"writing the chunk at {offset}: errno {errno}")


# -- sealed streams -----------------------------------------------------------------------------

cdef enum:
    _TAG_LEN = 16
    _PIECE = 128 * 1024     # bytes sealed or opened per step: stays in cache between the copy and the cipher
    _TIMED_OUT = 100        # _send_wait: a stall outlasted the socket's timeout
TAG_BYTES = _TAG_LEN
SEALED_HEADER_SIZE = HEADER_LEN + _TAG_LEN

cdef uint8_t _EMPTY[1]
cdef IMB_MGR* _MB = alloc_mb_mgr(0)  # a table of the best implementations for this CPU; the GCM
cdef IMB_ARCH _MB_ARCH = 0           # calls keep all their state in the caller's key and context
if _MB == NULL:
    raise ImportError("intel-ipsec-mb: alloc_mb_mgr failed")
init_mb_mgr_auto(_MB, &_MB_ARCH)
GCM_ARCH = _MB_ARCH  # intel-ipsec-mb's IMB_ARCH in use (5: AVX-512)


cdef int _send_wait(int fd, const uint8_t* buf, Py_ssize_t n, int timeout_ms) noexcept nogil:
    """send all of `buf`; on a non-blocking socket wait (poll) up to `timeout_ms` per stall
    (-1: no limit), as Python's socket timeout does. 0, _TIMED_OUT, or _OS_ERROR with errno set."""
    cdef ssize_t k
    cdef Py_ssize_t done = 0
    cdef pollfd p
    cdef int ready
    while done < n:
        k = send(fd, buf + done, n - done, MSG_NOSIGNAL)
        if k >= 0:
            done += k
        elif errno == EAGAIN:  # EWOULDBLOCK on Linux
            p.fd, p.events, p.revents = fd, POLLOUT, 0
            ready = poll(&p, 1, timeout_ms)
            if ready == 0:
                return _TIMED_OUT
            if ready < 0 and errno != EINTR:
                return _OS_ERROR
        elif errno != EINTR:
            return _OS_ERROR
    return 0


cdef class FrameCipher:
    """One direction of a sealed stream: AES-128-GCM, nonce = a 96-bit little-endian counter
    incremented before each seal or open (first nonce 1), exactly like sealed.FrameKey.

    The key schedule is computed once; each frame needs only its nonce. A key only seals or only
    opens in practice; both work, each with its own context.
    """

    cdef gcm_key_data* expanded
    cdef gcm_context_data* enc
    cdef gcm_context_data* dec
    cdef readonly uint64_t counter

    def __cinit__(self, const uint8_t[::1] key):
        if key.shape[0] != 16:
            raise ValueError(f"AES-128-GCM key must be 16 bytes, got {key.shape[0]}")
        self.expanded = <gcm_key_data*>aligned_alloc(64, (sizeof(gcm_key_data) + 63) // 64 * 64)
        self.enc = <gcm_context_data*>aligned_alloc(64, (sizeof(gcm_context_data) + 63) // 64 * 64)
        self.dec = <gcm_context_data*>aligned_alloc(64, (sizeof(gcm_context_data) + 63) // 64 * 64)
        if self.expanded == NULL or self.enc == NULL or self.dec == NULL:
            raise MemoryError()
        IMB_AES128_GCM_PRE(_MB, &key[0], self.expanded)
        self.counter = 0

    def __dealloc__(self):
        if self.expanded != NULL:
            memset(self.expanded, 0, sizeof(gcm_key_data))
        free(self.expanded)
        free(self.enc)
        free(self.dec)

    cdef inline void _nonce(self, uint8_t* iv) noexcept nogil:
        self.counter += 1
        memset(iv, 0, 12)
        _put(iv, self.counter, 8)

    cdef int seal_begin(self, const uint8_t* aad, Py_ssize_t aad_len) noexcept nogil:
        cdef uint8_t iv[12]
        self._nonce(iv)
        IMB_AES128_GCM_INIT(_MB, self.expanded, self.enc, iv, aad if aad_len else _EMPTY, aad_len)
        return 0

    cdef int seal_update(self, const uint8_t* src, uint8_t* dst, Py_ssize_t n) noexcept nogil:
        if n:
            IMB_AES128_GCM_ENC_UPDATE(_MB, self.expanded, self.enc, dst, src, n)
        return 0

    cdef int seal_end(self, uint8_t* tag) noexcept nogil:
        IMB_AES128_GCM_ENC_FINALIZE(_MB, self.expanded, self.enc, tag, _TAG_LEN)
        return 0

    cdef int open_begin(self, const uint8_t* aad, Py_ssize_t aad_len) noexcept nogil:
        cdef uint8_t iv[12]
        self._nonce(iv)
        IMB_AES128_GCM_INIT(_MB, self.expanded, self.dec, iv, aad if aad_len else _EMPTY, aad_len)
        return 0

    cdef int open_update(self, const uint8_t* src, uint8_t* dst, Py_ssize_t n) noexcept nogil:
        if n:
            IMB_AES128_GCM_DEC_UPDATE(_MB, self.expanded, self.dec, dst, src, n)
        return 0

    cdef int open_end(self, const uint8_t* tag) noexcept nogil:
        """0 when the tag matches (compared in constant time), -1 otherwise."""
        cdef uint8_t computed[16]
        cdef uint8_t diff = 0
        cdef int i
        IMB_AES128_GCM_DEC_FINALIZE(_MB, self.expanded, self.dec, computed, _TAG_LEN)
        for i in range(_TAG_LEN):
            diff |= computed[i] ^ tag[i]
        return 0 if diff == 0 else -1

    cdef int seal(self, const uint8_t* aad, Py_ssize_t aad_len, const uint8_t* src, Py_ssize_t n,
                  uint8_t* dst) noexcept nogil:
        """dst (n + 16 bytes) = ciphertext | tag."""
        if self.seal_begin(aad, aad_len) or self.seal_update(src, dst, n):
            return -1
        return self.seal_end(dst + n)

    cdef int open(self, const uint8_t* aad, Py_ssize_t aad_len, const uint8_t* src, Py_ssize_t n,
                  uint8_t* dst) noexcept nogil:
        """`src` is n + 16 bytes (ciphertext | tag); dst gets n bytes; -1 on a bad tag."""
        if self.open_begin(aad, aad_len) or self.open_update(src, dst, n):
            return -1
        return self.open_end(src + n)

    def seal_into(self, const uint8_t[::1] aad, const uint8_t[::1] payload, uint8_t[::1] out):
        """`out` (len(payload) + 16 bytes) gets the ciphertext and tag; `aad` is authenticated."""
        cdef Py_ssize_t n = payload.shape[0]
        cdef int rc
        if out.shape[0] != n + _TAG_LEN:
            raise ValueError(f"output is {out.shape[0]} bytes, expected {n + _TAG_LEN}")
        with nogil:
            rc = self.seal(_ptr(aad), aad.shape[0], _ptr(payload), n, &out[0])
        if rc:
            raise RuntimeError("AES-GCM seal failed")

    def open_into(self, const uint8_t[::1] aad, const uint8_t[::1] sealed, uint8_t[::1] out):
        """Check the tag and decrypt into `out` (len(sealed) - 16 bytes); False on a bad tag
        (`out` then holds unauthenticated bytes the caller must drop)."""
        cdef Py_ssize_t n = sealed.shape[0] - _TAG_LEN
        cdef int rc
        if n < 0 or out.shape[0] != n:
            raise ValueError(f"sealed input of {sealed.shape[0]} bytes cannot open into {out.shape[0]}")
        with nogil:
            rc = self.open(_ptr(aad), aad.shape[0], &sealed[0], n, _wptr(out))
        return rc == 0

    def open_in_place(self, const uint8_t[::1] aad, uint8_t[::1] data, const uint8_t[::1] tag):
        """Check `tag` and decrypt `data` where it lies (ciphertext received straight into the
        payload buffer, tag apart: no staging copy); False on a bad tag (`data` must be dropped)."""
        cdef Py_ssize_t n = data.shape[0]
        cdef int rc = 0
        if tag.shape[0] != _TAG_LEN:
            raise ValueError(f"tag is {tag.shape[0]} bytes, expected {_TAG_LEN}")
        with nogil:
            if self.open_begin(_ptr(aad), aad.shape[0]) or self.open_update(_wptr(data), _wptr(data), n):
                rc = -1
            else:
                rc = self.open_end(&tag[0])
        return rc == 0



cdef inline const uint8_t* _ptr(const uint8_t[::1] view) noexcept nogil:
    return &view[0] if view.shape[0] else _EMPTY


cdef inline uint8_t* _wptr(uint8_t[::1] view) noexcept nogil:
    return &view[0] if view.shape[0] else _EMPTY


def send_sealed_frame(int fd, FrameCipher key, const uint8_t[::1] header, tuple payload,
                      uint8_t[::1] staging, double timeout):
    """Send one sealed frame: header sealed alone (no associated data), then the payload, the
    concatenation of the `payload` buffers, sealed with the header as associated data (an empty
    payload is not sealed and takes no nonce), exactly as sealed.FrameKey would seal them. The
    payload goes through `staging` (at least 64 KiB) piece by piece, without the GIL. `timeout`
    bounds each stall of a non-blocking socket (< 0: none). Raises OSError like socket.sendmsg."""
    cdef Py_ssize_t count = len(payload), i, total = 0, pos, take, done
    cdef Py_ssize_t cap = staging.shape[0]
    cdef Py_buffer* views
    cdef uint8_t* stage = &staging[0] if cap else _EMPTY
    cdef int rc = 0, acquired = 0, err = 0
    cdef int timeout_ms = -1 if timeout < 0 else <int>(timeout * 1000)
    if header.shape[0] != _HEADER_LEN:
        raise ValueError(f"header is {header.shape[0]} bytes, expected {_HEADER_LEN}")
    if cap < 65536:
        raise ValueError(f"staging buffer of {cap} bytes is under 64 KiB")
    views = <Py_buffer*>malloc(sizeof(Py_buffer) * (count if count else 1))
    if views == NULL:
        raise MemoryError()
    try:
        for i in range(count):
            PyObject_GetBuffer(payload[i], &views[i], PyBUF_SIMPLE)
            acquired += 1
            total += views[i].len
        with nogil:
            rc = key.seal(NULL, 0, &header[0], _HEADER_LEN, stage)
            pos = _HEADER_LEN + _TAG_LEN
            if not rc and total:
                rc = key.seal_begin(&header[0], _HEADER_LEN)
                i = 0
                while not rc and i < count:
                    done = 0
                    while not rc and done < views[i].len:
                        if pos == cap:
                            rc = _send_wait(fd, stage, pos, timeout_ms)
                            pos = 0
                            continue
                        take = min(views[i].len - done, cap - pos, <Py_ssize_t>_PIECE)
                        rc = key.seal_update(<const uint8_t*>views[i].buf + done, stage + pos, take)
                        done += take
                        pos += take
                    i += 1
                if not rc and cap - pos < _TAG_LEN:
                    rc = _send_wait(fd, stage, pos, timeout_ms)
                    pos = 0
                if not rc:
                    rc = key.seal_end(stage + pos)
                    pos += _TAG_LEN
            if not rc:
                rc = _send_wait(fd, stage, pos, timeout_ms)
            err = errno
    finally:
        for i in range(acquired):
            PyBuffer_Release(&views[i])
        free(views)
    if rc == -1:
        raise RuntimeError("AES-GCM seal failed")
    if rc == _TIMED_OUT:
        raise TimeoutError(ETIMEDOUT, "timed out")
    if rc:
        raise OSError(err, f"sending a sealed frame: errno {err}")


cdef class RawFrameReceiver:
    """One data stream's receive state: the socket, the partial file, and the frame it expects.

    The socket must be in blocking mode (no timeout); `abort` on the channel (shutdown) ends a
    blocked call with _CLOSED. After _WRITTEN the caller records the chunk (journal) and passes its
    sequence to the next `next_frame` call, which sends that ACK before reading on: a chunk is
    acknowledged only once written and recorded (`next_frame(ack_last=True)`).
    """

    cdef int sock_fd, file_fd
    cdef uint64_t session, size, chunk_size
    cdef uint16_t stream
    cdef uint8_t version
    cdef uint8_t* header_ptr
    cdef uint8_t* payload_ptr
    cdef Py_ssize_t payload_cap
    cdef object _header, _payload  # keep the buffers alive
    cdef readonly uint64_t expected_seq
    cdef readonly uint64_t sequence, offset, checksum, index
    cdef readonly uint32_t raw_len
    cdef readonly int error
    cdef readonly bint partial
    cdef uint8_t ack[HEADER_LEN]
    # Sealed streams only: the two directions' keys, shared with the channel's Python path.
    cdef FrameCipher recv_key, send_key
    cdef bint sealed
    cdef uint8_t sealed_header[HEADER_LEN + _TAG_LEN]
    cdef uint8_t sealed_ack[HEADER_LEN + _TAG_LEN]
    cdef uint8_t tag[_TAG_LEN]
    cdef XXH3_state_t* hash_state

    def __init__(self, int sock_fd, int file_fd, uint8_t[::1] header, uint8_t[::1] payload,
                 uint64_t session, int stream, int version, uint64_t size, uint64_t chunk_size,
                 uint64_t expected_seq=0, FrameCipher recv_key=None, FrameCipher send_key=None):
        if (recv_key is None) != (send_key is None):
            raise ValueError("a sealed stream needs both keys (receive and send)")
        if header.shape[0] != _HEADER_LEN:
            raise ValueError(f"header buffer is {header.shape[0]} bytes, expected {_HEADER_LEN}")
        if chunk_size == 0 or chunk_size > <uint64_t>payload.shape[0]:
            raise ValueError(f"payload buffer of {payload.shape[0]} bytes cannot hold a {chunk_size}-byte chunk")
        if not 0 <= stream <= 0xFFFF or not 0 <= version <= 0xFF:
            raise ValueError(f"stream {stream} or version {version} out of range")
        self._header, self._payload = header, payload
        self.header_ptr = &header[0]
        self.payload_ptr = &payload[0]
        self.payload_cap = payload.shape[0]
        self.sock_fd, self.file_fd = sock_fd, file_fd
        self.session, self.stream, self.version = session, stream, version
        self.size, self.chunk_size = size, chunk_size
        self.expected_seq = expected_seq
        self.error = 0
        self.partial = False
        memset(self.ack, 0, HEADER_LEN)
        self.recv_key, self.send_key = recv_key, send_key
        self.sealed = recv_key is not None
        if self.sealed:
            self.hash_state = XXH3_createState()
            if self.hash_state == NULL:
                raise MemoryError()

    def __dealloc__(self):
        if self.hash_state != NULL:
            XXH3_freeState(self.hash_state)

    def handled(self, uint64_t sequence, uint64_t offset):
        """The caller received, wrote and recorded the frame whose header it was given: expect the
        next sequence, and acknowledge (`sequence`, `offset`) with the next call's `ack_last`, as
        after _WRITTEN (no ACK built and sent in Python)."""
        self.sequence, self.offset = sequence, offset
        self.expected_seq += 1

    def recv_payload(self, Py_ssize_t n):
        """Read the `n`-byte payload of the frame last handed back (HEADER) into the payload
        buffer, opened in place on a sealed stream (associated data: its header; an empty payload
        is not sealed), as the channel's recv_payload does. PAYLOAD, or CLOSED, OS_ERROR, TAG."""
        cdef int rc
        if n < 0 or n > self.payload_cap:
            raise ValueError(f"a payload of {n} bytes does not fit the {self.payload_cap}-byte buffer")
        with nogil:
            rc = self._recv_payload(n)
        return rc

    cdef int _recv_payload(self, Py_ssize_t n) noexcept nogil:
        cdef Py_ssize_t got = 0
        cdef int rc
        self.partial = False
        self.error = 0
        if self.sealed and n:
            rc = self._recv_opened(n, False)
        else:
            rc = _recv_all(self.sock_fd, self.payload_ptr, n, &got)
            if rc:
                self.partial = True
                self.error = errno if rc == _OS_ERROR else 0
        return rc if rc else _PAYLOAD

    def next_frame(self, bint ack_last=False):
        """With `ack_last`, first acknowledge the frame last _WRITTEN; then receive one frame.
        Returns one of WRITTEN, HEADER, CHECKSUM, CLOSED, OS_ERROR, TAG (sealed streams)."""
        cdef int rc
        with nogil:
            rc = self._next(ack_last)
        return rc

    cdef void _pack_ack(self, uint64_t sequence, uint64_t offset) noexcept nogil:
        cdef uint8_t* h = self.ack
        memset(h, 0, HEADER_LEN)
        _put(h, _MAGIC, 4)
        h[4] = self.version
        h[5] = _ACK
        _put(h + 8, self.session, 8)
        _put(h + 16, self.stream, 2)
        _put(h + 20, sequence, 8)
        _put(h + 28, offset, 8)
        _put(h + CRC_SPAN, _crc32(h, _CRC_SPAN), 4)

    cdef int _next(self, bint ack_last) noexcept nogil:
        cdef uint8_t* h = self.header_ptr
        cdef Py_ssize_t got = 0
        cdef uint64_t seq, offset, expected_len, encoded_len, index
        cdef uint32_t raw_len
        cdef int rc
        self.partial = False
        self.error = 0
        if ack_last:
            self._pack_ack(self.sequence, self.offset)
            if self.sealed:
                if self.send_key.seal(NULL, 0, self.ack, _HEADER_LEN, self.sealed_ack):
                    return _TAG
                rc = _send_all(self.sock_fd, self.sealed_ack, _HEADER_LEN + _TAG_LEN)
            else:
                rc = _send_all(self.sock_fd, self.ack, _HEADER_LEN)
            if rc:
                self.error = errno
                return _OS_ERROR
        if self.sealed:
            rc = _recv_all(self.sock_fd, self.sealed_header, _HEADER_LEN + _TAG_LEN, &got)
        else:
            rc = _recv_all(self.sock_fd, h, _HEADER_LEN, &got)
        if rc:
            self.partial = got > 0
            self.error = errno if rc == _OS_ERROR else 0
            return rc
        if self.sealed and self.recv_key.open(NULL, 0, self.sealed_header, _HEADER_LEN, h):
            return _TAG
        # Everything wire.unpack_header and the receive loop check; a doubt goes to Python.
        if <uint32_t>_le(h, 4) != _MAGIC or <uint32_t>_le(h + CRC_SPAN, 4) != _crc32(h, _CRC_SPAN):
            return _HEADER
        if h[4] != self.version or h[5] != _DATA or h[6] != 0 or h[7] != 0 or _le(h + 18, 2) != 0:
            return _HEADER
        if _le(h + 8, 8) != self.session or _le(h + 16, 2) != self.stream:
            return _HEADER
        seq = _le(h + 20, 8)
        offset = _le(h + 28, 8)
        raw_len = <uint32_t>_le(h + 36, 4)
        encoded_len = _le(h + 40, 4)
        if seq != self.expected_seq or offset % self.chunk_size or offset >= (self.size if self.size else 1):
            return _HEADER
        index = offset // self.chunk_size
        expected_len = self.size - offset if self.size - offset < self.chunk_size else self.chunk_size
        if raw_len != expected_len or encoded_len != raw_len or raw_len > self.payload_cap:
            return _HEADER
        self.sequence, self.offset, self.index, self.raw_len = seq, offset, index, raw_len
        self.checksum = _le(h + 44, 8)
        if self.sealed:
            rc = self._recv_sealed_payload(raw_len)
            if rc:
                return rc
        else:
            rc = _recv_all(self.sock_fd, self.payload_ptr, raw_len, &got)
            if rc:
                self.partial = True
                self.error = errno if rc == _OS_ERROR else 0
                return rc
            self.expected_seq += 1
            if XXH3_64bits(self.payload_ptr, raw_len) != self.checksum:
                return _CHECKSUM
        if _pwrite_all(self.file_fd, self.payload_ptr, raw_len, offset):
            self.error = errno
            return _OS_ERROR
        return _WRITTEN

    cdef int _recv_sealed_payload(self, Py_ssize_t n) noexcept nogil:
        """A raw chunk's sealed payload: read, opened and hashed (_recv_opened), then the checksum
        checked. 0, or the outcome to return."""
        cdef int rc = self._recv_opened(n, True)
        if rc:
            return rc
        self.expected_seq += 1
        if XXH3_64bits_digest(self.hash_state) != self.checksum:
            return _CHECKSUM
        return 0

    cdef int _recv_opened(self, Py_ssize_t n, bint hashed) noexcept nogil:
        """Read the `n`-byte sealed payload of the current header and decrypt it in place, in
        pieces that stay in cache (hashed into hash_state as they pass, with `hashed`), then check
        its tag (associated data: the header). 0, or the outcome to return (partial/error set)."""
        cdef Py_ssize_t done = 0, take, got = 0
        cdef uint8_t* p
        cdef int rc
        if self.recv_key.open_begin(self.header_ptr, _HEADER_LEN):
            return _TAG
        if hashed:
            XXH3_64bits_reset(self.hash_state)
        while done < n:
            take = min(n - done, <Py_ssize_t>_PIECE)
            p = self.payload_ptr + done
            rc = _recv_all(self.sock_fd, p, take, &got)
            if rc:
                self.partial = True
                self.error = errno if rc == _OS_ERROR else 0
                return rc
            if self.recv_key.open_update(p, p, take):
                return _TAG
            if hashed:
                XXH3_64bits_update(self.hash_state, p, take)
            done += take
        rc = _recv_all(self.sock_fd, self.tag, _TAG_LEN, &got)
        if rc:
            self.partial = True
            self.error = errno if rc == _OS_ERROR else 0
            return rc
        if self.recv_key.open_end(self.tag):
            return _TAG
        return 0
