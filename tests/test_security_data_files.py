"""Data files are read within bounds: a gzip-compressed IDX stream is decompressed only as far as its header
declares (a gzip bomb is refused), a CIFAR-10 pickle cannot amplify itself through memo references, and every
malformed file is a ValueError naming it (never LookupError, MemoryError or a long allocation)."""
from __future__ import annotations

import gzip
import pickle
import tracemalloc

import numpy as np
import pytest

from sim.tasks.cifar10 import read_batch
from sim.tasks.idx import read_idx, write_idx


def test_an_idx_gzip_bomb_is_refused_reading_only_what_the_header_declares(tmp_path):
    header = bytes([0, 0, 0x08, 1]) + np.asarray([16], dtype=">u4").tobytes()  # 16 labels
    bomb = tmp_path / "train-labels-idx1-ubyte.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as f:
        f.write(header + bytes(16))
        chunk = bytes(1 << 20)
        for _ in range(256):  # 256 MiB of zeros behind a valid 24-byte IDX file
            f.write(chunk)
    assert bomb.stat().st_size < 1 << 20
    tracemalloc.start()
    with pytest.raises(ValueError, match="more than the 24 bytes its IDX header declares"):
        read_idx(bomb)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 << 20, peak  # never decompressed


def test_an_idx_header_declaring_terabytes_is_refused(tmp_path):
    path = tmp_path / "images.gz"
    path.write_bytes(gzip.compress(bytes([0, 0, 0x08, 3]) + np.asarray([2**31, 2**16, 2**16], dtype=">u4").tobytes()))
    with pytest.raises(ValueError, match=r"declares shape \(2147483648, 65536, 65536\)"):
        read_idx(path)


def test_a_valid_gzip_idx_still_reads(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array, compress=True)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), array)


def _memo_bomb(rows: int) -> bytes:
    """A pickle of a dict whose b'data' is ``rows`` references to one 3072-int row (about 3 bytes each): a few
    hundred KB that ``np.asarray`` would expand to rows x 3072 bytes."""
    row = list(range(3072))
    out = bytearray(b"\x80\x02}q\x00(C\x04dataq\x01]q\x02")
    out += pickle.dumps(row, protocol=2)[2:-1] + b"q\x03"  # the row, memoized as 3
    out += b"a" + b"h\x03a" * (rows - 1)  # APPEND the row, then BINGET 3 + APPEND, rows - 1 times
    out += b"C\x06labelsq\x04]q\x05u."  # b'labels': []
    return bytes(out)


def test_cifar_memo_amplification_is_refused(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(_memo_bomb(200_000))  # 600 KB expanding to 600 MB
    with pytest.raises(ValueError, match="memo references"):
        read_batch(path)
    path.write_bytes(_memo_bomb(100))  # within the memo bound: b'data' must still be a uint8 array
    with pytest.raises(ValueError, match="b'data' a uint8 array"):
        read_batch(path)


def test_cifar_unknown_codec_is_a_value_error(tmp_path):
    # _codecs.encode is allowed (Python 3 writes bytes with it); an unknown encoding raised LookupError
    payload = b"\x80\x02}q\x00(C\x04dataq\x01c_codecs\nencode\nq\x02X\x01\x00\x00\x00aX\x07\x00\x00\x00nocodec\x86Rq\x03u."
    path = tmp_path / "data_batch_1"
    path.write_bytes(payload)
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch .*LookupError"):
        read_batch(path)
