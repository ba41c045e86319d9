"""Type stubs of native/stream.pyx."""

from dwcp_agent._native._buffers import ReadBytes, WriteBytes

WRITTEN: int
HEADER: int
CHECKSUM: int
CLOSED: int
OS_ERROR: int
TAG: int
PAYLOAD: int
TAG_BYTES: int
SEALED_HEADER_SIZE: int
HEADER_SIZE: int
HEADER_CRC_SPAN: int
FRAME_MAGIC: int
DATA_FRAME: int
ACK_FRAME: int
PAGE_SIZE: int

def crc32(data: ReadBytes) -> int: ...
def write_except_zero_pages(fd: int, data: ReadBytes, zero: ReadBytes, offset: int, punch: bool = False) -> None: ...

class FrameCipher:
    counter: int
    def __init__(self, key: ReadBytes) -> None: ...
    def seal_into(self, aad: ReadBytes, payload: ReadBytes, out: WriteBytes) -> None: ...
    def open_into(self, aad: ReadBytes, sealed: ReadBytes, out: WriteBytes) -> bool: ...
    def open_in_place(self, aad: ReadBytes, data: WriteBytes, tag: ReadBytes) -> bool: ...

def send_sealed_frame(fd: int, key: FrameCipher, header: ReadBytes, payload: tuple[ReadBytes, ...],
                      staging: WriteBytes, timeout: float) -> None: ...

class RawFrameReceiver:
    expected_seq: int
    sequence: int
    offset: int
    checksum: int
    index: int
    raw_len: int
    error: int
    partial: bool
    def __init__(self, sock_fd: int, file_fd: int, header: WriteBytes, payload: WriteBytes,
                 session: int, stream: int, version: int, size: int, chunk_size: int,
                 expected_seq: int = 0, recv_key: FrameCipher | None = None,
                 send_key: FrameCipher | None = None) -> None: ...
    def handled(self, sequence: int, offset: int) -> None: ...
    def recv_payload(self, n: int) -> int: ...
    def next_frame(self, ack_last: bool = False) -> int: ...
