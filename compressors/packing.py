"""Pack many per-worker tensors into one flat buffer per dtype, so a whole group costs one collective."""
from __future__ import annotations

from collections.abc import Mapping

import torch


def pack(tensors: Mapping[str, torch.Tensor]) -> list[tuple[torch.Tensor, list[tuple[str, torch.Size]]]]:
    """{name: (k, *s)} -> [(buffer (k, total), [(name, s), ...]) for each dtype], in insertion order."""
    by_dtype: dict[torch.dtype, list[str]] = {}
    for name, t in tensors.items():
        by_dtype.setdefault(t.dtype, []).append(name)
    packed = []
    for names in by_dtype.values():
        rows = tensors[names[0]].shape[0]
        buffer = torch.cat([tensors[n].reshape(rows, -1) for n in names], dim=1)  # (k, total)
        packed.append((buffer, [(n, tensors[n].shape[1:]) for n in names]))
    return packed


def unpack(flat: torch.Tensor, layout: list[tuple[str, torch.Size]]) -> dict[str, torch.Tensor]:
    """Inverse of one ``pack`` entry for a reduced buffer (total,) or a gathered one (rows, total)."""
    out = {}
    offset = 0
    lead = flat.shape[:-1]
    for name, shape in layout:
        size = shape.numel()
        out[name] = flat[..., offset:offset + size].reshape((*lead, *shape))  # a tuple: shape () works
        offset += size
    return out
