"""Type stubs of native/pagemap.pyx."""

from dwcp_agent._native._buffers import ReadBytes, WriteBytes

PAGE_SIZE: int
DONE: int
UNSUPPORTED: int

class PageMapWriter:
    def __init__(self, max_raw_len: int) -> None: ...
    def prepare(self, body: ReadBytes, raw_len: int, page0: int, scratch: WriteBytes, partial_fd: int,
                baseline_fd: int) -> int: ...
    def verify(self, expected: int) -> bool: ...
    def write(self, fd: int, offset: int, holes: bool = True, punch: bool = False) -> None: ...
