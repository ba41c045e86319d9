"""Only the Cython extensions live here; everything else is in pyproject.toml."""

from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

# stream.pyx seals and opens frames with intel-ipsec-mb's AES-GCM (apt: libipsec-mb-dev) and
# hashes payloads with libxxhash's CPU dispatch (apt: libxxhash-dev), as pagemap.pyx does. Every
# kernel's libraries are named here, nowhere else.
LIBRARIES = {"stream": ["IPSec_MB", "xxhash"], "pagemap": ["xxhash"]}

extensions = [
    Extension(
        f"dwcp_agent._native.{pyx.stem}",
        [str(pyx)],
        include_dirs=[numpy.get_include()],
        libraries=LIBRARIES.get(pyx.stem, []),
        extra_compile_args=["-O3", "-march=x86-64-v2", "-fno-strict-aliasing"],
    )
    for pyx in sorted(Path("native").glob("*.pyx"))
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    )
)
