"""HDE: the encoding that makes a migration cheaper than copying bytes."""

# The modules other packages use; the rest are internal to hde/.
__all__ = ["baseline", "chunk", "codecs", "layout", "selector"]
