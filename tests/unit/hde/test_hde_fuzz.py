"""Fuzz every HDE decoder with random and mutated inputs, and check what comes out.

Iterations per decoder come from DWCP_FUZZ_ITERATIONS (CI: 100,000; `make fuzz`: more). Inputs
are valid encodings of small chunks (every layout, codec and page kind, so mutations reach deep
into the page map) bent by bit flips, byte stores, truncation, extension, header rewrites and
length changes, plus plain random bytes. A failure prints the seed and iteration to replay it.

What is checked, as the receiver relies on it: every unmutated input decodes to exactly the
bytes it was made from; every mutated input is either refused with the documented error, or
decodes to bytes that are the original ones, or to bytes whose checksum differs from the one the
frame header carries, so the receiver's checksum check refuses them. Silently wrong bytes that
pass the check fail the test.
"""

from __future__ import annotations

import os
import random
import struct

import numpy as np
from hde_support import PAGE, MemoryPages, page_mix

from dwcp_agent._native import delta
from dwcp_agent.hde.baseline import HaveList
from dwcp_agent.hde.chunk import ChunkDecoder, ChunkEncoder, EncodedChunk, checksum
from dwcp_agent.hde.codecs import NAMES, CodecError, CodecId, codec_by_name
from dwcp_agent.hde.layout import FLAG_ALL_ZERO, FLAG_ZERO_MAP

ITERATIONS = int(os.environ.get("DWCP_FUZZ_ITERATIONS", "100000"))
SEED = int(os.environ.get("DWCP_FUZZ_SEED", "20260101"))
INTERESTING = (0, 1, 2, 6, 7, 0x7F, 0x80, 0xFF)


def _mutate(rnd: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rnd.randint(1, 3)):
        op = rnd.randrange(6)
        if op == 0 and buf:
            for _ in range(rnd.randint(1, 8)):
                i = rnd.randrange(len(buf))
                buf[i] ^= 1 << rnd.randrange(8)
        elif op == 1 and buf:
            buf[rnd.randrange(len(buf))] = rnd.choice(INTERESTING)
        elif op == 2:
            del buf[rnd.randint(0, len(buf)):]
        elif op == 3:
            buf += rnd.randbytes(rnd.randint(1, 64))
        elif op == 4 and len(buf) >= 12:
            # page-map header: body length and first page index
            field, value = rnd.choice([(0, rnd.getrandbits(32)), (0, len(buf) - 12 + rnd.randint(-3, 3)),
                                       (4, rnd.getrandbits(64)), (4, rnd.choice([0, 1 << 50, 2**64 - 1]))])
            size = 4 if field == 0 else 8
            buf[field:field + size] = (value % (1 << (8 * size))).to_bytes(size, "little")
        elif op == 5 and len(buf) > 4:
            i = rnd.randrange(len(buf) - 4)
            buf[i:i + 4] = rnd.randbytes(4)
    return bytes(buf)


def _zero_map_chunk(data: np.ndarray, codec: str) -> EncodedChunk:
    """The first-cut layout (still decoded): bitmap of zero pages + codec(non-zero pages). As the
    first-cut encoder (git 8457109) did, an all-zero chunk is FLAG_ALL_ZERO with no payload."""
    n = (len(data) + PAGE - 1) // PAGE
    zero = np.array([not data[i * PAGE:(i + 1) * PAGE].any() for i in range(n)], np.uint8)
    if zero.all():
        return EncodedChunk(CodecId.NONE, FLAG_ALL_ZERO, (b"",), len(data), 0)
    body = b"".join(data[i * PAGE:(i + 1) * PAGE].tobytes() for i in range(n) if not zero[i])
    c = codec_by_name(codec)
    packed = c.compress(body)
    return EncodedChunk(c.id, FLAG_ZERO_MAP, (np.packbits(zero, bitorder="little").tobytes() + packed,),
                        len(data), 0)


Sample = tuple[EncodedChunk, bytes]  # an encoding and the bytes it was made from


def _corpus() -> tuple[list[Sample], MemoryPages, MemoryPages]:
    rng = np.random.default_rng(5)
    image = page_mix(48, seed=6)
    baseline = MemoryPages(image)
    dest = MemoryPages(bytes(len(image)))
    corpus: list[Sample] = []
    sizes = [1, 100, PAGE - 1, PAGE, PAGE + 1, 2 * PAGE, 3 * PAGE + 5, 4 * PAGE]
    for codec in NAMES:
        enc = ChunkEncoder(codec_by_name(codec), delta_cache_bytes=1 << 20)
        enc.set_peer_have_list(_have(image))
        for size in sizes:
            data = page_mix(size // PAGE + 1, seed=size)[:size]
            corpus.append((enc.encode(memoryview(data)), data.tobytes()))
            corpus.append((_zero_map_chunk(data, codec), data.tobytes()))
        # references: SAME / BASELINE (the have-list), DUP_X and DELTA (acknowledged pages)
        for off in range(0, 16 * PAGE, 4 * PAGE):
            chunk = image[off:off + 4 * PAGE].copy()
            e = enc.encode(memoryview(chunk), off + 16 * PAGE)
            dest.write(off + 16 * PAGE, chunk.tobytes())
            enc.acked(off + 16 * PAGE, len(chunk), e.checksum)
            corpus.append((e, chunk.tobytes()))
            shifted = np.roll(image[:8 * PAGE].reshape(8, PAGE), 1, axis=0)[:4].reshape(-1).copy()
            corpus.append((enc.encode(memoryview(shifted), 40 * PAGE), shifted.tobytes()))
            chunk[rng.integers(0, len(chunk), 40)] ^= 0x21
            corpus.append((enc.encode(memoryview(chunk), off + 16 * PAGE), chunk.tobytes()))
    assert {c.flags for c, _ in corpus} >= {0, 1, 2, 4}
    assert all(c.checksum == checksum(data) for c, data in corpus if c.checksum)
    return corpus, dest, baseline


def _have(image: np.ndarray) -> HaveList:
    from dwcp_agent._native import pages
    n = len(image) // PAGE
    hashes = np.zeros((n, 2), np.uint64)
    pages.page_hashes(image, np.empty(n, np.uint8), hashes)
    return HaveList(hashes)


def _decode_or_none(decoder: ChunkDecoder, codec: int, flags: int, payload: bytes | memoryview, raw_len: int,
                   view: memoryview) -> bytes | None:
    """The decoded bytes, or None when the decoder refused the input (CodecError)."""
    try:
        decoder.decode(codec, flags, payload, raw_len, view)
    except CodecError:
        return None
    return bytes(view[:raw_len])


def test_every_corpus_chunk_round_trips_byte_exact() -> None:
    corpus, dest, baseline = _corpus()
    decoder = ChunkDecoder(read_page=dest, read_baseline=baseline)
    view = memoryview(bytearray(8 * PAGE))
    for n, (chunk, data) in enumerate(corpus):
        out = _decode_or_none(decoder, chunk.codec, chunk.flags, chunk.payload, chunk.raw_len, view)
        assert out == data, f"corpus entry {n} (codec {chunk.codec}, flags {chunk.flags}) did not round-trip"


def test_fuzz_chunk_decoder_refuses_or_the_checksum_does() -> None:
    corpus, dest, baseline = _corpus()
    decoder = ChunkDecoder(read_page=dest, read_baseline=baseline)
    rnd = random.Random(SEED)
    view = memoryview(bytearray(8 * PAGE))
    outcomes = {"round_trip": 0, "refused": 0, "checksum_refuses": 0, "same_bytes": 0}
    for i in range(ITERATIONS):
        base, original = rnd.choice(corpus)
        expected_sum = checksum(original)  # what the frame header carries
        codec, flags, raw_len = base.codec, base.flags, base.raw_len
        r = rnd.random()
        if r < 0.05:
            payload = rnd.randbytes(rnd.randint(0, 300))
            codec, flags = rnd.randrange(6), rnd.choice([0, 1, 2, 4, rnd.randrange(256)])
        else:
            payload = _mutate(rnd, base.payload) if r < 0.9 else base.payload
            if r >= 0.9 or rnd.random() < 0.1:
                choice = rnd.randrange(4)
                if choice == 0:
                    codec = rnd.randrange(6)
                elif choice == 1:
                    flags = rnd.choice([0, 1, 2, 3, 4, 6, 8, rnd.randrange(256)])
                else:
                    raw_len = max(0, min(len(view), raw_len + rnd.choice([-PAGE, -1, 1, PAGE, rnd.randint(-9, 9)])))
        unmutated = (codec, flags, raw_len) == (base.codec, base.flags, base.raw_len) and payload == base.payload
        where = f"seed {SEED} iteration {i}: codec={codec} flags={flags} raw_len={raw_len}"
        try:
            out = _decode_or_none(decoder, codec, flags, payload, raw_len, view)
        except Exception as exc:   # pragma: no cover - the failure report
            raise AssertionError(f"{where}: {type(exc).__name__}: {exc}; payload={payload[:64].hex()}") from exc
        if unmutated:
            assert out == original, f"{where}: an unmutated chunk did not round-trip"
            outcomes["round_trip"] += 1
        elif out is None:
            outcomes["refused"] += 1
        elif out == original:
            outcomes["same_bytes"] += 1  # the mutation did not change the meaning (e.g. padding bits)
        else:
            assert checksum(out) != expected_sum, f"{where}: wrong bytes pass the frame checksum"
            outcomes["checksum_refuses"] += 1
    assert outcomes["round_trip"] and outcomes["refused"] and outcomes["checksum_refuses"], outcomes


def test_fuzz_delta_decoder_refuses_or_the_checksum_does() -> None:
    rnd = random.Random(SEED + 1)
    rng = np.random.default_rng(SEED)
    old = rng.integers(0, 256, PAGE, dtype=np.uint8)
    streams: list[tuple[bytes, bytes]] = []  # (delta stream, the page it rebuilds from `old`)
    out = np.empty(2 * PAGE, np.uint8)
    for k in (1, 3, 20, 200, 2000):
        new = old.copy()
        new[rng.integers(0, PAGE, k)] ^= 0x5A
        n = delta.xor_encode(new, old, out)
        streams.append((out[:n].tobytes(), new.tobytes()))
    page = np.empty(PAGE, np.uint8)
    for stream, new_bytes in streams:
        page[:] = old
        delta.xor_decode(np.frombuffer(stream, np.uint8), page)
        assert page.tobytes() == new_bytes, "an unmutated delta did not round-trip"
    outcomes = {"refused": 0, "checksum_refuses": 0, "same_bytes": 0}
    for i in range(ITERATIONS):
        original, expected = rnd.choice(streams)
        stream = rnd.randbytes(rnd.randint(0, 40)) if rnd.random() < 0.2 else _mutate(rnd, original)
        size = rnd.choice([PAGE, PAGE, rnd.randint(0, PAGE)])
        page[:] = old
        try:
            delta.xor_decode(np.frombuffer(stream, np.uint8), page[:size])
        except ValueError:
            outcomes["refused"] += 1
            continue
        except Exception as exc:   # pragma: no cover - the failure report
            raise AssertionError(f"seed {SEED} iteration {i}: {exc!r} on {stream[:64].hex()}") from exc
        got = page.tobytes()
        if stream == original and size == PAGE:
            assert got == expected, f"seed {SEED} iteration {i}: an unmutated delta did not round-trip"
        if got == expected:
            outcomes["same_bytes"] += 1
        else:
            assert checksum(got) != checksum(expected), f"seed {SEED} iteration {i}: wrong page passes the checksum"
            outcomes["checksum_refuses"] += 1
    assert outcomes["refused"] and outcomes["checksum_refuses"], outcomes


def test_fuzz_have_list_parser_round_trips_and_raises_only_codec_error() -> None:
    """A have-list carries no data bytes: one bent into other hashes only makes the source reference
    pages the destination then rebuilds wrongly, which the chunk checksum refuses (fuzzed above)."""
    rnd = random.Random(SEED + 2)
    lists = [_have(page_mix(n, seed=n)) for n in (0, 1, 7, 64)]
    blobs = [h.to_bytes() for h in lists]
    for have, blob in zip(lists, blobs, strict=True):
        back = HaveList.from_bytes(blob)
        (index, rows), (want_index, want_rows) = back.sparse(), have.sparse()
        assert back.pages == have.pages, "a have-list did not round-trip its page count"
        assert np.array_equal(index, want_index) and np.array_equal(rows, want_rows), "a have-list did not round-trip"
    header = struct.Struct("<4sHHQ")
    good = 0
    for i in range(ITERATIONS):
        blob = rnd.choice(blobs)
        if rnd.random() < 0.1:
            blob = header.pack(b"DWHL", 1, 4, rnd.choice([0, 1, 2**32, 2**64 - 1])) + blob[header.size:]
        blob = _mutate(rnd, blob) if rnd.random() < 0.95 else blob
        try:
            HaveList.from_bytes(blob, max_pages=1 << 20)
            good += 1
        except CodecError:
            pass
        except Exception as exc:   # pragma: no cover - the failure report
            raise AssertionError(f"seed {SEED} iteration {i}: {exc!r} on {blob[:64].hex()}") from exc
    assert good
