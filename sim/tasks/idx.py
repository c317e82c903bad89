"""The IDX file format of (Fashion-)MNIST, read with numpy; gzip-compressed or not.

Layout (LeCun et al., http://yann.lecun.com/exdb/mnist/, "FILE FORMATS"): a 4-byte magic number
``0x00 0x00 <type> <ndim>``, then ``ndim`` big-endian uint32 dimension sizes, then the values in row-major
order, big-endian. Type codes: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64.
Images are ``ndim = 3`` (N, rows, cols) uint8, labels ``ndim = 1`` (N,) uint8.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
GZIP_MAGIC = b"\x1f\x8b"


def read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with gzip's magic (whatever its name says)."""
    raw = Path(path).read_bytes()
    if raw[:2] == GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as error:  # a truncated or corrupt gzip stream
            raise ValueError(f"{path}: not a readable gzip file ({error})") from None
    return raw


def parse_idx(data: bytes, source: str = "IDX data") -> np.ndarray:
    """IDX bytes -> a numpy array of the declared type and shape; ValueError naming what is wrong."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in TYPES:
        raise ValueError(f"{source}: not an IDX file (magic number {data[:4].hex() or 'missing'}; expected "
                         f"00 00 <type in {', '.join(f'{t:02x}' for t in TYPES)}> <ndim>)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{source}: truncated header ({len(data)} bytes, {header} needed for {ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(TYPES[data[2]])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{source}: {len(data)} bytes, but its header declares shape {shape} of {dtype.name} "
                         f"({expected} bytes): the file is truncated or corrupt")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path: Path) -> np.ndarray:
    return parse_idx(read_bytes(path), str(path))


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    """Write ``array`` in IDX format (used to make small test files in the real format)."""
    codes = {np.dtype(v).newbyteorder("="): k for k, v in TYPES.items()}
    dtype = np.dtype(array.dtype).newbyteorder("=")
    if dtype not in codes:
        raise ValueError(f"write_idx: dtype {array.dtype} is invalid; allowed: {sorted(str(d) for d in codes)}")
    header = bytes([0, 0, codes[dtype], array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array).astype(TYPES[codes[dtype]]).tobytes()
    Path(path).write_bytes(gzip.compress(payload, mtime=0) if compress else payload)
