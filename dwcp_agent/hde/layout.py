"""The chunk payload layout: flags, page kinds, and the page-map header (docs/hde.md has the spec).

A chunk travels as (codec id, flags, payload) in its frame. With FLAG_PAGE_MAP the payload is
    u32 body_len | u64 page0 | codec(body)
and the body, once decoded, is
    kinds[n_pages] u8 | refs u64[n_ref] | delta_lens u16[n_delta] | literal pages | delta streams
where refs hold one entry per DUP_IN / DUP_X / BASELINE page and delta_lens one per DELTA page,
both in page order. `page0` is the chunk's first page index in the object (offset / 4096), which
SAME and DELTA pages use to find their reference without a per-page entry.
"""

from __future__ import annotations

import struct
from enum import IntEnum

PAGE_SIZE = 4096

FLAG_ALL_ZERO = 0x01   # no payload: every page is zero
FLAG_ZERO_MAP = 0x02   # first-cut layout: zero bitmap + codec(non-zero pages); still decoded
FLAG_PAGE_MAP = 0x04   # page map (this module)
KNOWN_FLAGS = FLAG_ALL_ZERO | FLAG_ZERO_MAP | FLAG_PAGE_MAP
# A data-stream frame, not a chunk payload: no payload, and [offset, offset + raw_len) is a hole
# at the source (whole chunks, the last possibly short). Never seen by the decoder.
FLAG_HOLE = 0x08

PAGE_MAP_HEADER = struct.Struct("<IQ")
# A delta longer than this is not worth it: the literal page through the codec is about as small.
DELTA_LIMIT = 2048
# Page indexes (and so offsets) stay far below 2**63 when multiplied by the page size.
MAX_PAGE_INDEX = 1 << 50


class PageKind(IntEnum):
    """How one page of a chunk is sent; values are the bytes of the page map."""

    LITERAL = 0    # bytes in the literal section (through the codec)
    ZERO = 1       # all zero, nothing sent
    DUP_IN = 2     # same bytes as an earlier page of this chunk (ref = its index in the chunk)
    DUP_X = 3      # same bytes as a page the receiver acknowledged (ref = its page index)
    BASELINE = 4   # same bytes as a page of the receiver's baseline (ref = baseline page index)
    SAME = 5       # unchanged from the receiver's baseline at this very page index
    DELTA = 6      # XOR delta against the acknowledged version at this page index


HAS_REF = (PageKind.DUP_IN, PageKind.DUP_X, PageKind.BASELINE)
# Label of dwcp_v3_hde_pages_total for each kind.
METRIC_KIND = {
    PageKind.LITERAL: "literal", PageKind.ZERO: "zero", PageKind.DUP_IN: "dup", PageKind.DUP_X: "dup",
    PageKind.BASELINE: "baseline", PageKind.SAME: "baseline", PageKind.DELTA: "delta",
}


def pages_in(raw_len: int) -> int:
    """Pages of a chunk of raw_len bytes (the last one may be short)."""
    return (raw_len + PAGE_SIZE - 1) // PAGE_SIZE


def max_body_len(raw_len: int) -> int:
    """Largest page-map body a chunk of raw_len bytes can have: every page's map and ref entries
    plus the raw bytes (a delta is never longer than the page it replaces)."""
    return pages_in(raw_len) * (1 + 8 + 2) + raw_len


def max_encoded_len(raw_len: int) -> int:
    """Largest payload a sender may announce for a chunk (codec framing and page maps included);
    receivers size their buffers and refuse frames by it."""
    return raw_len + raw_len // 16 + 4096
