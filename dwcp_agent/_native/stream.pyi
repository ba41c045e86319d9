"""Type stubs of native/stream.pyx."""

WRITTEN: int
HEADER: int
CHECKSUM: int
CLOSED: int
OS_ERROR: int
HEADER_SIZE: int

def crc32(data: bytes | bytearray | memoryview) -> int: ...
def write_except_zero_pages(fd: int, data: memoryview | bytearray | bytes, zero: object, offset: int) -> None: ...

class RawFrameReceiver:
    expected_seq: int
    sequence: int
    offset: int
    checksum: int
    index: int
    raw_len: int
    error: int
    partial: bool
    def __init__(self, sock_fd: int, file_fd: int, header: bytearray | memoryview, payload: bytearray | memoryview,
                 session: int, stream: int, version: int, size: int, chunk_size: int,
                 expected_seq: int = 0) -> None: ...
    def skip(self) -> None: ...
    def next_frame(self, ack_last: bool = False) -> int: ...
