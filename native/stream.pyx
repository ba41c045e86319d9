# cython: language_level=3
"""Receive loop of one TCP data stream for raw DATA frames, without the GIL.

`RawFrameReceiver.next_frame` does, for one frame, what the Python receive loop does for a chunk
sent as is (codec none, no flags): send the pending ACK, read the 56-byte header, check it (magic,
CRC, type, version, session, stream, sequence, offset, lengths), read the payload, verify its
xxh3-64 and write it at its offset. Any frame it does not handle completely (a frame to decode,
or one that fails a check) is handed back to the caller, header still in `header`, payload not
read, so the Python path applies the same checks and raises the same errors; only a checksum
mismatch is reported after the payload has been read. Header layout: dwcp_agent/wire.py.
"""

from libc.errno cimport EINTR, errno
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memset
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


cdef extern from *:
    """
    #define XXH_INLINE_ALL
    #include <xxhash.h>
    """
    uint64_t XXH3_64bits(const void* data, size_t n) nogil


cdef enum Outcome:
    _WRITTEN = 0    # frame verified and written; its fields are in the receiver's attributes
    _HEADER = 1     # a header the caller must handle: payload not read
    _CHECKSUM = 2   # payload read, its xxh3-64 does not match the header
    _CLOSED = 3     # the peer closed (or the stream was shut down); `partial` says mid-frame
    _OS_ERROR = 4   # a system call failed; `error` holds errno

# Outcomes of next_frame (mirrored in dwcp_agent/_native/stream.pyi).
WRITTEN = _WRITTEN
HEADER = _HEADER
CHECKSUM = _CHECKSUM
CLOSED = _CLOSED
OS_ERROR = _OS_ERROR

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

    def __init__(self, int sock_fd, int file_fd, uint8_t[::1] header, uint8_t[::1] payload,
                 uint64_t session, int stream, int version, uint64_t size, uint64_t chunk_size,
                 uint64_t expected_seq=0):
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

    def skip(self):
        """The caller handled the frame whose header it was given: expect the next sequence."""
        self.expected_seq += 1

    def next_frame(self, bint ack_last=False):
        """With `ack_last`, first acknowledge the frame last _WRITTEN; then receive one frame.
        Returns one of WRITTEN, HEADER, CHECKSUM, CLOSED, OS_ERROR."""
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
            if _send_all(self.sock_fd, self.ack, HEADER_LEN):
                self.error = errno
                return _OS_ERROR
        rc = _recv_all(self.sock_fd, h, _HEADER_LEN, &got)
        if rc:
            self.partial = got > 0
            self.error = errno if rc == _OS_ERROR else 0
            return rc
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
