"""Buffer types the kernels accept (typed memoryviews of native/*.pyx), for the stubs beside this.

`const uint8_t[::1]` takes any C-contiguous byte buffer; `uint8_t[::1]` needs a writable one;
the wider element types and 2-D views are numpy arrays of exactly that dtype.
"""

from typing import TypeAlias

import numpy as np
import numpy.typing as npt

ReadBytes: TypeAlias = bytes | bytearray | memoryview | npt.NDArray[np.uint8]
WriteBytes: TypeAlias = bytearray | memoryview | npt.NDArray[np.uint8]
U8: TypeAlias = npt.NDArray[np.uint8]
U16: TypeAlias = npt.NDArray[np.uint16]
U64: TypeAlias = npt.NDArray[np.uint64]
I64: TypeAlias = npt.NDArray[np.int64]
Hashes: TypeAlias = np.ndarray[tuple[int, int], np.dtype[np.uint64]] | npt.NDArray[np.uint64]
Pages: TypeAlias = np.ndarray[tuple[int, int], np.dtype[np.uint8]] | npt.NDArray[np.uint8]
