"""The receiver's way to verify and write a FLAG_PAGE_MAP chunk without building it first.

`ChunkDecoder.decode` rebuilds a page-map chunk in a buffer (every literal and duplicate page
copied, every zero page cleared), the receiver hashes that buffer and copies it again into the
page cache. `write_page_map_chunk` checks the page-map header and decompresses the body here, as
`_decode_page_map` does, then lets the native writer (native/pagemap.pyx) check the map, hash the
chunk from where its pages lie and pwritev them straight from there. A malformed payload raises
CodecError as the decoder would; a chunk with DELTA pages returns None untouched, for the decoder.
"""

from __future__ import annotations

from dwcp_agent.hde.baseline import FilePages
from dwcp_agent.hde.codecs import CodecError, CodecId, codec_by_id
from dwcp_agent.hde.layout import MAX_PAGE_INDEX, PAGE_MAP_HEADER, max_body_len, pages_in
from dwcp_agent.kernels import pagemap

__all__ = ["write_page_map_chunk"]

_NONE = CodecId.NONE


def write_page_map_chunk(fd: int, codec_id: int, payload: memoryview, raw_len: int, offset: int, checksum: int,
                         scratch: memoryview, partial: FilePages | None, baseline: FilePages | None,
                         holes: bool, punch: bool) -> bool | None:
    """Verify and write one page-map chunk at `offset` of `fd`: True when written, False when its
    checksum does not match (nothing written), None when it holds DELTA pages (nothing done).

    `holes`: the file reads as zeros in this chunk, so ZERO pages are not written (with `punch`,
    they are punched). `scratch` (raw_len bytes) receives pages read from `partial`/`baseline`."""
    n_pages = pages_in(raw_len)
    if len(payload) < PAGE_MAP_HEADER.size:
        raise CodecError("page-map header is truncated")
    body_len, page0 = PAGE_MAP_HEADER.unpack_from(payload)
    if body_len > max_body_len(raw_len) or body_len < n_pages:
        raise CodecError(f"page-map body of {body_len} bytes is impossible for {raw_len} raw bytes")
    if page0 + n_pages > MAX_PAGE_INDEX:
        raise CodecError(f"chunk page index {page0} is out of range")
    packed = payload[PAGE_MAP_HEADER.size:]
    body = packed if codec_id == _NONE else codec_by_id(codec_id).decompress(packed, body_len)
    if len(body) != body_len:
        raise CodecError(f"page-map body of {len(body)} bytes, header says {body_len}")
    try:
        outcome = pagemap.write_page_map(fd, body, raw_len, page0, scratch, partial.fd if partial else -1,
                                         baseline.fd if baseline else -1, checksum, offset, holes, punch)
    except ValueError as exc:
        raise CodecError(str(exc)) from None
    if outcome == pagemap.UNSUPPORTED:
        return None
    return outcome == pagemap.DONE
