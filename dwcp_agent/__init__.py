"""dwcp-agent: moves virtual-machine state between hosts over DWCP v3."""

import os

# The agent's only linear algebra is PBA's small least-squares fits (pba/predictor.py). OpenBLAS
# would start a worker thread per core at numpy's import, and after each fit those threads spin on
# the cores the data path needs: 1.5-1.9 % of a migrating source's CPU samples (perf, 1 GiB vm-mix).
# Set before anything imports numpy; an operator's own setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"

__all__ = ["__version__"]
