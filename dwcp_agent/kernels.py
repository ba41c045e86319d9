"""The compiled kernels (native/*.pyx), imported in this one place and checked on the way in.

The kernels hard-code the page size, the frame header layout and the page kinds (native/layout.pxd);
Python defines them in hde/layout.py and wire.py. Importing this module compares the two, so a
change on one side only fails loudly at import instead of corrupting data. Without built kernels
the ImportError says how to build them.
"""

from __future__ import annotations

from types import ModuleType

from dwcp_agent import wire
from dwcp_agent.hde.layout import PAGE_SIZE, PageKind

try:
    from dwcp_agent._native import delta, index, pagemap, pages, stream
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(f"dwcp_agent's native kernels are not built ({exc}): run `make native` in the "
                      "source tree (it builds dwcp_agent/_native from native/*.pyx)") from exc

__all__ = ["check_constants", "delta", "index", "pagemap", "pages", "stream"]


def check_constants(pages: ModuleType, stream: ModuleType, delta: ModuleType, index: ModuleType,
                    pagemap: ModuleType) -> None:
    """ImportError naming every constant the kernels were compiled with that Python disagrees with."""
    expected = [
        ("pages.PAGE_SIZE", pages.PAGE_SIZE, PAGE_SIZE),
        ("delta.PAGE_SIZE", delta.PAGE_SIZE, PAGE_SIZE),
        ("index.PAGE_SIZE", index.PAGE_SIZE, PAGE_SIZE),
        ("stream.PAGE_SIZE", stream.PAGE_SIZE, PAGE_SIZE),
        ("pagemap.PAGE_SIZE", pagemap.PAGE_SIZE, PAGE_SIZE),
        ("pages.KIND_LITERAL", pages.KIND_LITERAL, PageKind.LITERAL),
        ("pages.KIND_ZERO", pages.KIND_ZERO, PageKind.ZERO),
        ("pages.KIND_DUP_IN", pages.KIND_DUP_IN, PageKind.DUP_IN),
        ("stream.HEADER_SIZE", stream.HEADER_SIZE, wire.HEADER_SIZE),
        ("stream.HEADER_CRC_SPAN", stream.HEADER_CRC_SPAN, wire.HEADER_SIZE - 4),
        ("stream.FRAME_MAGIC", stream.FRAME_MAGIC, wire.MAGIC),
        ("stream.DATA_FRAME", stream.DATA_FRAME, wire.FrameType.DATA),
        ("stream.ACK_FRAME", stream.ACK_FRAME, wire.FrameType.ACK),
    ]
    wrong = [f"{name} is {got}, Python says {want}" for name, got, want in expected if got != want]
    if wrong:
        raise ImportError("native kernels disagree with the Python layout (rebuild with `make native`): "
                          + "; ".join(wrong))


check_constants(pages, stream, delta, index, pagemap)
