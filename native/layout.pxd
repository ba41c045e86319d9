# Constants every kernel shares with the Python side (dwcp_agent/hde/layout.py, dwcp_agent/wire.py).
# Each extension exposes the values it was compiled with; dwcp_agent/kernels.py compares them with
# Python's when it imports the kernels, so a change on one side only cannot go unnoticed.

cdef enum:
    PAGE = 4096            # hde.layout.PAGE_SIZE
    HEADER_LEN = 56        # wire.HEADER_SIZE
    CRC_SPAN = 52          # header bytes covered by the header CRC
    MAGIC = 0x33435744     # wire.MAGIC
    FRAME_DATA = 2         # wire.FrameType.DATA
    FRAME_ACK = 3          # wire.FrameType.ACK
    PAGE_LITERAL = 0       # hde.layout.PageKind
    PAGE_ZERO = 1
    PAGE_DUP_IN = 2
