"""Migration: sessions that move an object (image file, VM memory) between agents."""

# The modules other packages use; the rest are internal to migration/.
__all__ = ["buffers", "bytestream", "core", "extents", "history", "images", "manager", "outgoing", "server"]
