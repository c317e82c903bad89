"""Saving and loading a DDP hook's state (``HookState.state_dict`` / ``load_state_dict``) as untrusted data.

A state dict is plain containers and tensors (``torch.load(..., weights_only=True)`` opens it) with a SHA-256
checksum of everything else (``compressors.serialization.digest``). Loading rebuilds records only from the
registered types (``compressors.serialization``), verifies the checksum, and checks every bucket's state
against a fresh state of the aggregator for that bucket's shapes: a crafted or corrupt file is a ValueError
naming the first problem, and never runs anything.

Nothing is allocated for what a file merely declares: every tensor is checked on its metadata before its bytes
are read (``check_tensor``), a bucket declares at most ``MAX_BUCKET_ELEMENTS`` elements, and the fresh state
it is compared with is built on the ``meta`` device (shapes without storage). Numbers are range-checked
(``check_values``): seed within 64 bits, counters within the hook's calls, ranks >= 1, every float finite.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..base import Aggregator
from ..serialization import check_same_structure, check_values, digest, from_plain, to_plain
from ..state_tree import tensor_leaves

FORMAT_VERSION = 3  # 3: adds ``steps`` (optimizer steps committed, for warm-up counting after a resume)
_HOOK_KEYS = ("format_version", "seed", "calls", "steps", "buckets", "checksum")
MAX_BUCKET_ELEMENTS = 2**31  # elements one bucket may declare (8 GiB of float32; DDP's default cap is 25 MB)


def hook_state_dict(state) -> dict[str, Any]:
    """The plain, checksummed state dict of a ``HookState``."""
    body = {"format_version": FORMAT_VERSION, "seed": state.seed, "calls": state.calls, "steps": state.steps,
            "buckets": [{"key": list(k) if isinstance(k, tuple) else k, "shapes": [list(s) for s in e["shapes"]],
                         "state": to_plain(e["state"])} for k, e in state.buckets.items()]}
    return {**body, "checksum": digest(body)}


def _hook_error(what: str) -> ValueError:
    return ValueError(f"HookState.load_state_dict: {what}")


def checked_hook_state(saved: Any, aggregator: Aggregator, named: bool) -> tuple[int, int, int, dict[Any, dict]]:
    """(seed, calls, steps, buckets) from a ``state_dict()``, validated; ValueError naming the first problem."""
    if type(saved) is not dict:
        raise _hook_error(f"a {type(saved).__name__} is invalid; allowed: the dict HookState.state_dict() returns")
    if saved.get("format_version") != FORMAT_VERSION:
        raise _hook_error(f"format_version={saved.get('format_version')!r} is invalid; allowed: "
                          f"{FORMAT_VERSION} (state dicts of this version, with a checksum)")
    if set(saved) != set(_HOOK_KEYS):
        raise _hook_error(f"keys {sorted(map(str, saved))} are invalid; allowed: exactly {sorted(_HOOK_KEYS)}")
    body = {k: saved[k] for k in _HOOK_KEYS[:-1]}
    try:
        intact = saved["checksum"] == digest(body)  # digest refuses unexpected types and deep nesting itself
    except ValueError as error:
        raise _hook_error(str(error)) from None
    if not intact:
        raise _hook_error("checksum mismatch: the state was altered or corrupted after it was saved")
    seed, calls, steps, buckets = body["seed"], body["calls"], body["steps"], body["buckets"]
    for field, value, high in (("seed", seed, 2**64 - 1), ("calls", calls, 2**63 - 1), ("steps", steps, 2**63 - 1)):
        if type(value) is not int or not 0 <= value <= high:
            raise _hook_error(f"{field}={value!r} is invalid; allowed: an integer in [0, {high}]")
    if type(buckets) is not list:
        raise _hook_error(f"buckets is a {type(buckets).__name__}; allowed: a list")
    out: dict[Any, dict] = {}
    for i, bucket in enumerate(buckets):
        key, entry = _checked_bucket(bucket, f"buckets[{i}]", aggregator, seed, named, calls)
        if key in out:
            raise _hook_error(f"buckets[{i}].key={bucket['key']!r} is invalid; allowed: a key not used before")
        out[key] = entry
    return seed, calls, steps, out


def _checked_bucket(bucket: Any, where: str, aggregator: Aggregator, seed: int, named: bool, calls: int):
    if type(bucket) is not dict or set(bucket) != {"key", "shapes", "state"}:
        raise _hook_error(f"{where} is invalid; allowed: a dict with exactly the keys key, shapes, state")
    key, shapes = bucket["key"], bucket["shapes"]
    if named:
        if type(key) is not list or not key or not all(type(n) is str for n in key) or len(set(key)) != len(key):
            raise _hook_error(f"{where}.key={key!r} is invalid; allowed: a non-empty list of distinct parameter "
                              "names (the hook was built with model=)")
    elif type(key) is not int or key < 0:
        raise _hook_error(f"{where}.key={key!r} is invalid; allowed: a bucket index >= 0 (the hook was built "
                          "without model=)")
    if type(shapes) is not list or not all(type(s) is list and all(type(d) is int and d >= 0 for d in s)
                                           for s in shapes):
        raise _hook_error(f"{where}.shapes is invalid; allowed: a list of shapes (lists of integers >= 0)")
    names = list(key) if named else [str(j) for j in range(len(shapes))]
    if len(names) != len(shapes):
        raise _hook_error(f"{where}: {len(shapes)} shapes for {len(names)} parameter names; allowed: one each")
    declared = sum(math.prod(s) for s in shapes)
    if declared > MAX_BUCKET_ELEMENTS:
        raise _hook_error(f"{where}.shapes declare {declared} elements; allowed: at most {MAX_BUCKET_ELEMENTS}")
    try:
        state = from_plain(bucket["state"], f"{where}.state")  # every tensor checked before it is read
        like = next((t for t in tensor_leaves(state) if t.is_floating_point()), torch.empty(0))
        fresh = aggregator.init({n: tuple(s) for n, s in zip(names, shapes)}, workers=1, seed=seed, dtype=like.dtype,
                                device="meta")  # shapes only: nothing allocated for the declared sizes
        check_same_structure(state, fresh, f"{where}.state")
        check_values(state, fresh, calls, f"{where}.state")
    except ValueError as error:
        raise _hook_error(str(error)) from None
    return (tuple(key) if named else key), {"shapes": tuple(tuple(s) for s in shapes), "params": None, "state": state}

