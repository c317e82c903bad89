"""The IDX file format of (Fashion-)MNIST, read with numpy; gzip-compressed or not.

Layout (LeCun et al., http://yann.lecun.com/exdb/mnist/, "FILE FORMATS"): a 4-byte magic number
``0x00 0x00 <type> <ndim>``, then ``ndim`` big-endian uint32 dimension sizes, then the values in row-major
order, big-endian. Type codes: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64.
Images are ``ndim = 3`` (N, rows, cols) uint8, labels ``ndim = 1`` (N,) uint8.

A gzip stream is decompressed only as far as its header's counts say (at most ``MAX_BYTES``): a small file that
would expand to gigabytes (a gzip bomb) is refused after reading one byte more than its header declares.
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
GZIP_MAGIC = b"\x1f\x8b"
MAX_BYTES = 1 << 31  # the largest IDX payload read (Fashion-MNIST's training images are 47 MB)


def read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with gzip's magic (whatever its name says), never more than
    the IDX header inside declares (``declared_size``)."""
    with open(path, "rb") as f:
        compressed = f.read(2) == GZIP_MAGIC
    if not compressed:
        return Path(path).read_bytes()
    try:
        with gzip.open(path, "rb") as stream:
            head = stream.read(4)
            head += stream.read(4 * head[3]) if len(head) == 4 else b""
            size = declared_size(head, str(path))
            body = stream.read(size - len(head) + 1)  # one byte more than declared: is there more?
    except (OSError, EOFError, zlib.error) as error:  # a truncated or corrupt gzip stream
        raise ValueError(f"{path}: not a readable gzip file ({error})") from None
    if len(head) + len(body) > size:
        raise ValueError(f"{path}: the gzip stream holds more than the {size} bytes its IDX header declares; "
                         "allowed: exactly the declared data (refused without decompressing the rest)")
    return head + body


def declared_size(head: bytes, source: str) -> int:
    """The byte size an IDX header declares (magic, dimensions and values), at most ``MAX_BYTES``; for a header
    that is not IDX, its own length (``parse_idx`` then says what is wrong)."""
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in TYPES or len(head) < 4 + 4 * head[3]:
        return len(head)
    ndim = head[3]
    shape = np.frombuffer(head, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    size = 4 + 4 * ndim + int(np.prod(shape, dtype=object)) * np.dtype(TYPES[head[2]]).itemsize
    if size > MAX_BYTES:
        raise ValueError(f"{source}: its IDX header declares shape {tuple(int(d) for d in shape)} ({size} bytes); "
                         f"allowed: at most {MAX_BYTES} bytes")
    return size


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
    expected = header + int(np.prod(shape, dtype=object)) * dtype.itemsize
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
