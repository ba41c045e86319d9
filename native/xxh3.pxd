# libxxhash's runtime dispatch (AVX-512 / AVX2 / SSE2 as the CPU has them), for every kernel that
# hashes payloads: xxhash.h inlined into a module built with -march=x86-64-v2 is held to SSE2, about
# a third of the speed (measured: 12 vs 32-36 GB/s on 128 KiB pieces in cache). The dispatch header
# maps XXH3_64bits and XXH3_64bits_update onto the dispatching versions. Link with libxxhash
# (apt: libxxhash-dev).

from libc.stdint cimport uint64_t

cdef extern from *:
    """
    #include <xxhash.h>
    #include <xxh_x86dispatch.h>
    """
    uint64_t XXH3_64bits(const void* data, size_t n) nogil
    ctypedef struct XXH3_state_t:
        pass
    XXH3_state_t* XXH3_createState() nogil
    int XXH3_freeState(XXH3_state_t* state) nogil
    int XXH3_64bits_reset(XXH3_state_t* state) nogil
    int XXH3_64bits_update(XXH3_state_t* state, const void* data, size_t n) nogil
    uint64_t XXH3_64bits_digest(const XXH3_state_t* state) nogil
