"""The receiver's way to verify and write a FLAG_PAGE_MAP chunk without building it first.

`ChunkDecoder.decode` rebuilds a page-map chunk in a buffer (every literal and duplicate page
copied, every zero page cleared), the receiver hashes that buffer and copies it again into the
page cache. `PageMapWriter.decode` checks the page-map header and decompresses the body here, as
`_decode_page_map` does, then lets the native writer (native/pagemap.pyx) check the map and point
every page at where its bytes lie; `matches` hashes the chunk from there and `write` pwritevs the
pages straight from there, only after `matches` said yes. The three steps are apart so that the
receiver times the decode alone (the `hde` operation), as for chunks the decoder builds. A
malformed payload raises CodecError as the decoder would; a chunk with DELTA pages is left to the
decoder (`decode` returns False, nothing read or written).
"""

from __future__ import annotations

from dwcp_agent.hde.baseline import FilePages
from dwcp_agent.hde.codecs import Codec, CodecError, CodecId, codec_by_id
from dwcp_agent.hde.layout import MAX_PAGE_INDEX, PAGE_MAP_HEADER, max_body_len, pages_in
from dwcp_agent.kernels import pagemap

__all__ = ["PageMapWriter"]

_NONE = CodecId.NONE


class PageMapWriter:
    """One stream's page-map writer: its page-pointer array and hash state are allocated once,
    for chunks of up to `chunk_size` bytes. Pages referenced in `partial`/`baseline` are read
    from those files."""

    def __init__(self, chunk_size: int, partial: FilePages | None, baseline: FilePages | None) -> None:
        self._native = pagemap.PageMapWriter(chunk_size)
        self._partial_fd = partial.fd if partial else -1
        self._baseline_fd = baseline.fd if baseline else -1
        self._codecs: dict[int, Codec] = {}  # by id: codec_by_id builds an enum and a Codec per call

    def decode(self, codec_id: int, payload: memoryview, raw_len: int, scratch: memoryview) -> bool:
        """Check one page-map payload and point its pages at their bytes: True when ready to
        verify, False when it holds DELTA pages (for the decoder). `scratch` (raw_len bytes)
        receives the pages read from the files and must stay untouched until `write`."""
        n_pages = pages_in(raw_len)
        if len(payload) < PAGE_MAP_HEADER.size:
            raise CodecError("page-map header is truncated")
        body_len, page0 = PAGE_MAP_HEADER.unpack_from(payload)
        if body_len > max_body_len(raw_len) or body_len < n_pages:
            raise CodecError(f"page-map body of {body_len} bytes is impossible for {raw_len} raw bytes")
        if page0 + n_pages > MAX_PAGE_INDEX:
            raise CodecError(f"chunk page index {page0} is out of range")
        packed = payload[PAGE_MAP_HEADER.size:]
        body: memoryview | bytes = packed
        if codec_id != _NONE:
            codec = self._codecs.get(codec_id)
            if codec is None:
                codec = self._codecs[codec_id] = codec_by_id(codec_id)  # an unknown id: CodecError
            body = codec.decompress(packed, body_len)
        if len(body) != body_len:
            raise CodecError(f"page-map body of {len(body)} bytes, header says {body_len}")
        try:
            outcome = self._native.prepare(body, raw_len, page0, scratch, self._partial_fd, self._baseline_fd)
        except ValueError as exc:
            raise CodecError(str(exc)) from None
        return outcome == pagemap.DONE

    def matches(self, checksum: int) -> bool:
        """Whether the decoded chunk's xxh3-64 is `checksum`; when not, it can no longer be written."""
        return self._native.verify(checksum)

    def write(self, fd: int, offset: int, holes: bool, punch: bool) -> None:
        """Write the matched chunk at `offset` of `fd`. `holes`: the file reads as zeros in this
        chunk, so ZERO pages are not written (with `punch`, they are punched)."""
        self._native.write(fd, offset, holes, punch)
