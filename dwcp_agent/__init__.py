"""dwcp-agent: moves virtual-machine state between hosts over DWCP v3."""

__version__ = "0.1.0"

__all__ = ["__version__"]
