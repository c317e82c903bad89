"""State records as plain data, and back, through an explicit allow-list of record types.

    @register_record
    class PowerSGDState(NamedTuple): ...

    plain = to_plain(state)           # dicts, lists, tuples, numbers, strings, None and tensors only
    state = from_plain(plain)         # records rebuilt only from registered types
    digest(plain)                     # SHA-256 of the plain structure, tensors' bytes included

A record (a NamedTuple or a frozen dataclass holding state) is stored as
``{"__record__": "<registered name>", "fields": {field: value, ...}}``. Loading looks that name up in the
registry filled by ``register_record`` where each type is defined: nothing named by a file is ever imported,
looked up as an attribute or called. Anything else in the data (an unknown name, a wrong field set, a
non-string key, an unexpected Python type, nesting deeper than ``MAX_DEPTH``) is a ``ValueError`` naming what
is wrong and where (``$.state.aggregator.compressed`` style paths from the top of the file).

Every tensor read from a file is checked before anything reads its elements (``check_tensor``): a plain
``torch.Tensor`` (not an ``nn.Parameter`` or another subclass), dense and strided on a real device (not sparse,
meta, quantized, conjugated or negated; checkpoints are read onto the CPU), not requiring gradients, and stored once: its strides a permutation of the
contiguous ones (no expanded, stride-0 or overlapping views) within a storage that holds every element. A file
therefore never makes the loader allocate more than the file itself holds.

``check_same_structure(loaded, fresh)`` compares a loaded state with a freshly initialised one of the same
configuration (record types, keys, lengths, tensor shapes, dtypes and layouts), so a file cannot smuggle in a
state the code would later trip over. ``check_values(loaded, fresh, max_step)`` then checks the numbers: every
float finite (tensors too: error-feedback memory, factors, moments), counters (``step``, ``decisions``) in
``[0, max_step]``, ranks at least 1, seeds within 64 bits, every other integer in ``[0, 2**63)``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import struct
from collections.abc import Callable
from typing import Any, TypeVar

import torch

RECORD = "__record__"
FIELDS = "fields"
LEGACY_TAG = "__namedtuple__"  # the tag of files written before the registry (refused: it named code to import)
MAX_DEPTH = 32  # nesting levels accepted in a file; real states nest about 8 deep
_RECORDS: dict[str, type] = {}  # registered name -> type
_NAMES: dict[type, str] = {}  # type -> registered name
_SCALARS = (type(None), bool, int, float, str)
COUNTER_FIELDS = ("step", "decisions")  # per-step counters of records: at most the run's steps
MAX_RANK = 2**31 - 1

T = TypeVar("T", bound=type)


def register_record(cls: T | None = None, *, record_name: str | None = None) -> T | Callable[[T], T]:
    """Allow ``cls`` (a NamedTuple or frozen dataclass) in checkpoints under ``record_name`` (default: its name).

    The name is what files store: keep it stable. A second type under a taken name is refused.
    """
    def decorate(kind: T) -> T:
        is_namedtuple = isinstance(kind, type) and issubclass(kind, tuple) and hasattr(kind, "_fields")
        is_frozen = dataclasses.is_dataclass(kind) and kind.__dataclass_params__.frozen
        if not (is_namedtuple or is_frozen):
            raise ValueError(f"register_record: {kind!r} is invalid; allowed: a NamedTuple or a frozen dataclass")
        name = record_name if record_name is not None else kind.__name__
        if not isinstance(name, str) or not name:
            raise ValueError(f"register_record: record_name={name!r} is invalid; allowed: a non-empty string")
        taken = _RECORDS.get(name)
        if taken is not None and _qualified(taken) != _qualified(kind):  # the same class re-imported is fine
            raise ValueError(f"register_record: record_name={name!r} is already taken by {_qualified(taken)}; "
                             f"allowed: a name not registered yet (for {_qualified(kind)})")
        _RECORDS[name] = kind
        _NAMES[kind] = name
        return kind

    return decorate(cls) if cls is not None else decorate


def registered_records() -> dict[str, type]:
    """A copy of the allow-list: registered name -> type."""
    return dict(_RECORDS)


def record_name(kind: type) -> str | None:
    """The name ``kind`` is stored under, or None when it is not registered."""
    return _NAMES.get(kind)


def is_record(value: Any) -> bool:
    """Whether ``value`` is a NamedTuple or dataclass instance (registered or not)."""
    return (isinstance(value, tuple) and hasattr(value, "_fields")) or (
        dataclasses.is_dataclass(value) and not isinstance(value, type))


def _qualified(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def _fields(kind: type) -> tuple[str, ...]:
    if issubclass(kind, tuple):
        return tuple(kind._fields)
    return tuple(f.name for f in dataclasses.fields(kind) if f.init)


# -- writing -------------------------------------------------------------------------------------------------
def to_plain(value: Any, path: str = "$") -> Any:
    """Nested state -> dicts/lists/tuples/tensors/numbers/strings/None; registered records become tagged dicts."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if is_record(value):
        name = _NAMES.get(type(value))
        if name is None:
            raise ValueError(f"state at {path}: type {_qualified(type(value))} is not a registered record; "
                             "allowed: types decorated with compressors.serialization.register_record")
        return {RECORD: name, FIELDS: {f: to_plain(getattr(value, f), f"{path}.{f}") for f in _fields(type(value))}}
    if isinstance(value, (tuple, list)):
        kind = list if isinstance(value, list) else tuple
        return kind(to_plain(v, f"{path}[{i}]") for i, v in enumerate(value))
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str) or k in (RECORD, LEGACY_TAG)]
        if bad:
            raise ValueError(f"state at {path}: dict keys {bad!r} are invalid; allowed: strings other than "
                             f"{RECORD!r} and {LEGACY_TAG!r}")
        return {k: to_plain(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, _SCALARS):
        return value
    raise ValueError(f"state at {path}: a value of type {type(value).__name__} cannot be saved; allowed: tensors, "
                     "numbers, strings, None, and tuples/lists/dicts/registered records of them")


# -- reading -------------------------------------------------------------------------------------------------
def from_plain(value: Any, path: str = "$") -> Any:
    """Inverse of ``to_plain`` for untrusted data: records only from the registry, ValueError on anything else."""
    return _decode(value, path, 0)


def _decode(value: Any, path: str, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise ValueError(f"state at {path}: nested deeper than {MAX_DEPTH} levels; allowed: at most {MAX_DEPTH}")
    if type(value) in _SCALARS:
        return value
    if isinstance(value, torch.Tensor):
        check_tensor(value, path)
        return value
    if type(value) in (list, tuple):
        return type(value)(_decode(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value))
    if type(value) is dict:
        if RECORD in value:
            return _decode_record(value, path, depth)
        if LEGACY_TAG in value:
            raise ValueError(f"state at {path}: a {LEGACY_TAG!r} type tag is invalid (written by an older version "
                             f"that stored importable names); allowed: {RECORD!r} tags of registered records")
        _check_keys(value, path)
        return {k: _decode(v, f"{path}.{k}", depth + 1) for k, v in value.items()}
    raise ValueError(f"state at {path}: a value of type {type(value).__name__} is invalid; allowed: dicts, lists, "
                     "tuples, tensors, numbers, strings and None")


def _check_keys(value: dict, path: str) -> None:
    bad = [k for k in value if type(k) is not str]
    if bad:
        raise ValueError(f"state at {path}: dict keys {bad[:5]!r} are invalid; allowed: strings")


def _decode_record(value: dict, path: str, depth: int) -> Any:
    if set(value) != {RECORD, FIELDS}:
        raise ValueError(f"state at {path}: a record holds keys {sorted(map(str, value))}; "
                         f"allowed: exactly {[RECORD, FIELDS]}")
    name, fields = value[RECORD], value[FIELDS]
    kind = _RECORDS.get(name) if type(name) is str else None
    if kind is None:
        shown = name if type(name) is str and len(name) <= 200 else f"<{type(name).__name__}>"
        raise ValueError(f"state at {path}: record type {shown!r} is invalid; allowed: registered records "
                         f"({', '.join(sorted(_RECORDS))})")
    if type(fields) is not dict:
        raise ValueError(f"state at {path}.{FIELDS}: a {type(fields).__name__} is invalid; allowed: a dict")
    _check_keys(fields, f"{path}.{FIELDS}")
    expected = _fields(kind)
    if set(fields) != set(expected):
        missing = [f for f in expected if f not in fields]
        extra = sorted(f for f in fields if f not in expected)
        raise ValueError(f"state at {path}: record {name!r} has missing fields {missing} and unexpected fields "
                         f"{extra}; allowed: exactly {list(expected)}")
    return kind(**{f: _decode(fields[f], f"{path}.{f}", depth + 1) for f in expected})


def check_tensor(t: torch.Tensor, path: str = "$") -> None:
    """ValueError unless ``t`` is a plain tensor on a real device that stores each of its elements exactly once:
    checked on its metadata only, so an expanded view of terabytes or a meta tensor is refused before any
    element is read."""
    problem = ""
    if type(t) is not torch.Tensor:
        problem = f"a {type(t).__name__}"
    elif t.layout != torch.strided:
        problem = f"a {t.layout} tensor"
    elif t.device.type == "meta":  # shapes without data (a real device is fine: a GPU run's hook state)
        problem = f"a tensor on device {t.device.type!r}"
    elif t.is_quantized or t.is_conj() or t.is_neg():
        problem = "a quantized, conjugated or negated tensor"
    elif t.requires_grad:
        problem = "a tensor requiring gradients"
    elif not _stored_once(t):
        problem = f"a tensor of shape {tuple(t.shape)} with strides {t.stride()} (expanded or overlapping) or " \
                  "a storage too small for it"
    if problem:
        raise ValueError(f"state at {path}: {problem} is invalid; allowed: a plain dense tensor (each element "
                         "stored once, requires_grad=False, not meta)")


def _stored_once(t: torch.Tensor) -> bool:
    """Strides a permutation of the contiguous ones (dims of size 1 aside), inside the storage."""
    if t.numel() == 0:
        return t.storage_offset() >= 0
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    end = (t.storage_offset() + t.numel()) * t.element_size()
    return t.storage_offset() >= 0 and end <= t.untyped_storage().nbytes()


def check_values(loaded: Any, fresh: Any, max_step: int, path: str = "$") -> None:
    """ValueError naming the first number out of range in ``loaded`` (already shaped like ``fresh``, see
    ``check_same_structure``): non-finite floats and float tensors, counters outside ``[0, max_step]``, ranks
    below 1, seeds beyond 64 bits, other integers outside ``[0, 2**63)``."""
    _check_values(loaded, fresh, max_step, path, "")


def _check_values(loaded: Any, fresh: Any, max_step: int, path: str, field: str) -> None:
    if is_record(fresh):
        for f in _fields(type(fresh)):
            _check_values(getattr(loaded, f), getattr(fresh, f), max_step, f"{path}.{f}", f)
    elif isinstance(fresh, dict):
        for k in fresh:
            _check_values(loaded[k], fresh[k], max_step, f"{path}.{k}", field if field == "ranks" else k)
    elif isinstance(fresh, (list, tuple)):
        for i, (a, b) in enumerate(zip(loaded, fresh)):
            _check_values(a, b, max_step, f"{path}[{i}]", field)
    elif isinstance(loaded, torch.Tensor):
        if loaded.is_floating_point() or loaded.is_complex():
            if not bool(torch.isfinite(loaded).all()):
                raise ValueError(f"state at {path}: holds NaN/Inf; allowed: finite values")
    elif type(loaded) is float:
        if not math.isfinite(loaded):
            raise ValueError(f"state at {path}: {loaded!r} is invalid; allowed: a finite number")
    elif type(loaded) is int:
        if field in ("rank", "ranks"):
            low, high, what = 1, MAX_RANK, "a rank"
        elif field in COUNTER_FIELDS:
            low, high, what = 0, max_step, "a step count within the run"
        elif field == "seed":
            low, high, what = 0, 2**64 - 1, "a seed within 64 bits"
        else:
            low, high, what = 0, 2**63 - 1, "an integer within 63 bits"
        if not low <= loaded <= high:
            raise ValueError(f"state at {path}: {loaded} is invalid; allowed: {what}, in [{low}, {high}]")


def loads_json(text: str | bytes, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` of untrusted text whose arrays and objects nest at most ``max_depth`` deep (ValueError
    otherwise, before parsing: Python's parser would recurse into a RecursionError on deep nesting)."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    depth, in_string, escaped = 0, False, False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > max_depth:
                raise ValueError(f"JSON nested deeper than {max_depth} levels; allowed: at most {max_depth}")
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return json.loads(data)


# -- integrity -----------------------------------------------------------------------------------------------
def digest(plain: Any) -> str:
    """SHA-256 (hex) of a plain structure: every container's kind, length and keys in order, every scalar
    exactly (floats by their IEEE-754 bytes), every tensor's dtype, shape and raw bytes. Deterministic: equal
    structures give equal digests on every run and machine of the same byte order. ValueError (with the path)
    on a value ``from_plain`` would refuse, so it can be run on untrusted data before decoding it."""
    h = hashlib.sha256()
    _feed(h, plain, "$", 0)
    return h.hexdigest()


def _feed(h, value: Any, path: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ValueError(f"state at {path}: nested deeper than {MAX_DEPTH} levels; allowed: at most {MAX_DEPTH}")
    kind = type(value)
    if value is None:
        h.update(b"N")
    elif kind is bool:
        h.update(b"B1" if value else b"B0")
    elif kind is int:
        h.update(b"I%d;" % value)
    elif kind is float:
        h.update(b"F" + struct.pack("<d", value))
    elif kind is str:
        data = value.encode("utf-8", "surrogatepass")
        h.update(b"S%d;" % len(data) + data)
    elif kind in (list, tuple):
        h.update(b"%s%d;" % (b"L" if kind is list else b"T", len(value)))
        for i, v in enumerate(value):
            _feed(h, v, f"{path}[{i}]", depth + 1)
    elif kind is dict:
        _check_keys(value, path)
        h.update(b"D%d;" % len(value))
        for k, v in value.items():
            _feed(h, k, path, depth + 1)
            _feed(h, v, f"{path}.{k}", depth + 1)
    elif isinstance(value, torch.Tensor):
        check_tensor(value, path)
        t = value.contiguous()
        h.update(f"X{t.dtype};{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    else:
        raise ValueError(f"state at {path}: a value of type {kind.__name__} is invalid; allowed: dicts, lists, "
                         "tuples, tensors, numbers, strings and None")


# -- schema --------------------------------------------------------------------------------------------------
def check_same_structure(loaded: Any, fresh: Any, path: str = "$") -> None:
    """ValueError naming the first place where ``loaded`` differs in structure from ``fresh``.

    Equal: record types, dict keys, sequence kinds and lengths, tensor dtypes, shapes and layouts, scalar types,
    and strings (names of tensors and groups, fixed by the configuration). Numbers may differ (counters, seeds).
    """
    if is_record(fresh):
        if type(loaded) is not type(fresh):
            raise ValueError(f"state at {path}: a {_describe(loaded)} is invalid; allowed: record "
                             f"{_NAMES.get(type(fresh), type(fresh).__name__)!r} (as this configuration starts with)")
        for f in _fields(type(fresh)):
            check_same_structure(getattr(loaded, f), getattr(fresh, f), f"{path}.{f}")
    elif isinstance(fresh, dict):
        if type(loaded) is not dict:
            raise ValueError(f"state at {path}: a {_describe(loaded)} is invalid; allowed: a dict")
        if set(loaded) != set(fresh):
            missing = [k for k in fresh if k not in loaded]
            extra = [k for k in loaded if k not in fresh]
            raise ValueError(f"state at {path}: missing keys {missing[:10]} and unexpected keys {extra[:10]}; "
                             f"allowed: exactly {list(fresh)[:20]}")
        for k in fresh:
            check_same_structure(loaded[k], fresh[k], f"{path}.{k}")
    elif isinstance(fresh, (list, tuple)):
        kind = list if isinstance(fresh, list) else tuple
        if type(loaded) is not kind or len(loaded) != len(fresh):
            raise ValueError(f"state at {path}: a {_describe(loaded)} is invalid; allowed: a {kind.__name__} "
                             f"of length {len(fresh)}")
        for i, (a, b) in enumerate(zip(loaded, fresh)):
            check_same_structure(a, b, f"{path}[{i}]")
    elif isinstance(fresh, torch.Tensor):
        if not isinstance(loaded, torch.Tensor) or (loaded.dtype, tuple(loaded.shape), loaded.layout) != (
                fresh.dtype, tuple(fresh.shape), fresh.layout):
            raise ValueError(f"state at {path}: a {_describe(loaded)} is invalid; allowed: a {fresh.layout} tensor "
                             f"of shape {tuple(fresh.shape)} and dtype {fresh.dtype}")
    elif isinstance(fresh, str):
        if loaded != fresh:
            raise ValueError(f"state at {path}: {_describe(loaded)} is invalid; allowed: {fresh!r}")
    elif type(loaded) is not type(fresh) and not (type(fresh) is float and type(loaded) is int):
        raise ValueError(f"state at {path}: a {_describe(loaded)} is invalid; allowed: a {type(fresh).__name__}")
    elif type(fresh) is float and not math.isfinite(loaded):
        raise ValueError(f"state at {path}: {loaded!r} is invalid; allowed: a finite number")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.layout} tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    if is_record(value):
        return f"record {_NAMES.get(type(value), type(value).__name__)!r}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of length {len(value)}"
    if isinstance(value, str):
        return repr(value[:100])
    return type(value).__name__
