"""Placement and host-synchronisation checks without an accelerator: ``PlacementCheck``.

A run on an accelerator must keep every tensor on it (a CPU tensor mixed into a device operation is either an
error or a hidden copy every step) and must rarely wait for it (each ``.item()``, ``float(t)``, ``bool(t)``,
``.tolist()``, ``.cpu()`` of a device tensor stops the host until the device has finished). Both can be
checked on a machine without one: inside ``PlacementCheck()`` the ``meta`` device stands for the accelerator.
Meta tensors have shapes and dtypes but no values, so a run with ``device="meta"`` executes every operation's
shape logic in milliseconds, and the check sees every torch call (a ``TorchFunctionMode``):

- an operation mixing a tensor on the device with a non-scalar CPU tensor is recorded in ``mixed`` (the
  operation's name and the caller's file and line), then carried on with the CPU tensors moved to the device,
  so one run finds every such place; 0-d CPU tensors mix legally (as on CUDA) and explicit transfers
  (``.to``, ``.copy_``) are not mixing;
- an explicit copy of a CPU array onto the device (``.to``, ``.copy_``) is legal but counted in ``uploaded``
  (elements), so a per-step copy of something gradient-sized (random numbers drawn on the host) shows;
- a host read of a device tensor is counted in ``syncs`` (and listed in ``sync_sites``) and, on ``meta``,
  answered with zeros of the right type and shape (``0.0``, ``0``, ``False``, a list of zeros, a zero CPU
  tensor for ``.cpu()``), so code that branches on a value goes on (on its zero branch).

    with PlacementCheck() as check:
        sim.run(sim.Experiment(device="meta", ...))
    assert not check.mixed and check.syncs <= ...

``PlacementCheck(device="cpu")`` only counts host reads of CPU tensors (the same code run for real on the
CPU): the count a CUDA run would pay, with real values.
"""
from __future__ import annotations

import traceback
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

#: Reads that make the host wait for the device; the value a meta tensor answers with is built by ``_zero``.
SYNC_METHODS = {
    torch.Tensor.item: "item", torch.Tensor.tolist: "tolist", torch.Tensor.__float__: "float",
    torch.Tensor.__int__: "int", torch.Tensor.__index__: "index", torch.Tensor.__bool__: "bool",
    torch.Tensor.numpy: "numpy", torch.Tensor.cpu: "cpu",
}
#: Explicit transfers: a CPU tensor among their arguments is the point, not a mix-up.
TRANSFERS = {torch.Tensor.to, torch.Tensor.copy_, torch.Tensor.cpu, torch.Tensor.cuda, torch.Tensor.type,
             torch.Tensor.new_tensor, torch.as_tensor, torch.tensor, torch._has_compatible_shallow_copy_type,
             torch.Tensor.data.__set__}  # the last two: nn.Module.to replacing a parameter's data
_OWN_FILES = ("/torch/", __file__, "/contextlib.py", "/functools.py")


class PlacementCheck(TorchFunctionMode):
    """Record operations mixing ``device`` tensors with non-scalar CPU tensors; count host reads of ``device``
    tensors (answered with zeros on ``meta``); count elements copied from the host onto ``device``.
    Attributes: ``mixed`` (list of "operation at file:line"), ``syncs`` (the count), ``sync_sites`` (Counter of
    "kind at file:line"), ``uploaded`` (elements of CPU arrays copied to the device by explicit transfers),
    ``upload_sites`` (Counter of "elements at file:line")."""

    def __init__(self, device: str | torch.device = "meta"):
        super().__init__()
        self.device = torch.device(device)
        self.mixed: list[str] = []
        self.syncs = 0
        self.sync_sites: Counter[str] = Counter()
        self.uploaded = 0
        self.upload_sites: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = SYNC_METHODS.get(func)
        if kind is not None and args and isinstance(args[0], torch.Tensor) and self._on_device(args[0]):
            self.syncs += 1
            self.sync_sites[f"{kind} at {_caller()}"] += 1
            if args[0].device.type == "meta":
                return _zero(kind, args[0])
            return func(*args, **kwargs)
        if self.device.type != "cpu" and func in TRANSFERS:
            source = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if (func is torch.Tensor.to and source is not None and self._on_device(source)
                    and self.device.type != "cpu"):
                result_device = _target_device(args[1:], kwargs)
                if result_device is not None and result_device.type == "cpu":  # a copy to the host: a read
                    self.syncs += 1
                    self.sync_sites[f"to cpu at {_caller()}"] += 1
                    if source.device.type == "meta":
                        return torch.zeros(source.shape, dtype=_target_dtype(args[1:], kwargs) or source.dtype)
            result = func(*args, **kwargs)
            if isinstance(result, torch.Tensor) and self._on_device(result):
                size = sum(t.numel() for t in tree_flatten((args, kwargs))[0]
                           if isinstance(t, torch.Tensor) and _host_array(t))
                if size:
                    self.uploaded += size
                    self.upload_sites[f"{size} at {_caller()}"] += 1
            return result
        if self.device.type != "cpu":
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            if any(self._on_device(t) for t in tensors) and any(_host_array(t) for t in tensors):
                self.mixed.append(f"{getattr(func, '__qualname__', getattr(func, '__name__', repr(func)))} at "
                                  f"{_caller()}")
                args, kwargs = tree_map(self._moved, (args, kwargs))
        return func(*args, **kwargs)

    def _on_device(self, t: torch.Tensor) -> bool:
        return t.device.type == self.device.type

    def _moved(self, value):
        return value.to(self.device) if isinstance(value, torch.Tensor) and _host_array(value) else value


def _target_device(args, kwargs) -> torch.device | None:
    """The device a ``Tensor.to(...)`` call names, if any."""
    for value in [*args, kwargs.get("device")]:
        if isinstance(value, (str, torch.device)):
            return torch.device(value)
        if isinstance(value, torch.Tensor):
            return value.device
    return None


def _target_dtype(args, kwargs) -> torch.dtype | None:
    for value in [*args, kwargs.get("dtype")]:
        if isinstance(value, torch.dtype):
            return value
    return None


def _host_array(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dim() > 0


def _zero(kind: str, t: torch.Tensor):
    """What a host read of a meta tensor answers: zeros of the type the read would give."""
    zeros = torch.zeros(t.shape, dtype=t.dtype)
    if kind == "cpu":
        return zeros
    if kind == "numpy":
        return zeros.numpy()
    if kind == "tolist":
        return zeros.tolist()
    return {"float": 0.0, "int": 0, "index": 0, "bool": False}.get(kind, zeros.item() if t.numel() == 1 else 0)


def _caller() -> str:
    """file:line of the nearest frame outside torch and this module (where the operation was written)."""
    for frame in reversed(traceback.extract_stack(limit=40)):
        if not any(part in frame.filename or frame.filename == part for part in _OWN_FILES):
            return f"{frame.filename.rsplit('/', 2)[-2]}/{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
    return "?"
