"""Type stubs of native/pagemap.pyx."""

from dwcp_agent._native._buffers import ReadBytes, WriteBytes

PAGE_SIZE: int
DONE: int
CHECKSUM: int
UNSUPPORTED: int

def write_page_map(fd: int, body: ReadBytes, raw_len: int, page0: int, scratch: WriteBytes, partial_fd: int,
                   baseline_fd: int, expected: int, offset: int, holes: bool = True, punch: bool = False) -> int: ...
