"""The registry: ``compressors.make(name, **options)`` builds any registered aggregator.

A factory is a function of keyword-only options with defaults; its signature is the list of allowed
options, so unknown names are caught (with the closest suggestion) before the factory runs, and the
factory validates values. ``REGISTRY`` maps name -> factory.

Registration checks the new entry, so a compressor that a caller could not use fails where it is written,
not after a whole run:

- every factory: its options are keyword-only (a positional one could never be given to ``make``);
- a factory defined outside this package (a user's compressor), built with its default options: the
  aggregator's ``init``/``reduce``/``bits_per_step`` accept every way the simulator, the DDP hook, the
  wrappers and the cost model call them, and one step on tiny shapes keeps shapes and dtype, stays finite
  and sends what ``bits_per_step`` declares (``compressors.registration_check.one_step_check``). A factory
  with an option that has no default cannot be built here; only its signature is checked.

Built-in compressors (registered when ``compressors`` is imported) get the signature check only, to keep the
import cheap; the full contract battery (``compressors.testing.check_compressor``) runs on each of them in
``tests/test_contract.py``. ``register(name, check=False)`` skips the checks.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from .base import Aggregator
from .options import check_known_options, closest
from .registration_check import one_step_check

Factory = Callable[..., Aggregator]
REGISTRY: dict[str, Factory] = {}

EXPECTED = {
    "init": "init(self, shapes, workers, seed=0, *, dtype=torch.float32, device='cpu')",
    "reduce": "reduce(self, grads, state, comm, want_local=False)",
    "bits_per_step": "bits_per_step(self, shapes, *, dtype=torch.float32)",
}
#: Every way a caller of the project invokes the three methods (positional args, keyword args).
CALL_FORMS = {
    "init": [
        (("shapes", "workers"), {}),
        (("shapes",), {"workers": 2, "seed": 0}),  # sim.cost, compressors.testing
        (("shapes",), {"workers": 2, "seed": 0, "dtype": torch.float32}),  # sim.run
        (("shapes",), {"workers": 1, "seed": 0, "dtype": torch.float32, "device": "cpu"}),  # DDP hook, PowerSGD
        (("shapes", 2, 0), {"dtype": torch.float32, "device": "cpu"}),  # wrappers: error feedback, warm-up, partition
    ],
    "reduce": [
        (("grads", "state", "comm"), {}),
        (("grads", "state", "comm", True), {}),  # warm-up and partition wrappers
        (("grads", "state", "comm"), {"want_local": True}),  # error feedback, Aggregator.aggregate
    ],
    "bits_per_step": [
        (("shapes",), {}),  # the cost model
        (("shapes",), {"dtype": torch.float32}),  # sim.run
    ],
}


def register(name: str, *, check: bool = True) -> Callable[[Factory], Factory]:
    """Decorator: ``@compressors.register("mine")`` on a factory of keyword-only options with defaults.

    Raises ValueError naming what is missing (see the module docstring); nothing is registered then."""
    def decorate(factory: Factory) -> Factory:
        if not isinstance(name, str) or not name:
            raise ValueError(f"register: name={name!r} is invalid; allowed: a non-empty string")
        if name in REGISTRY:
            raise ValueError(f"compressor {name!r} is registered twice")
        if check:
            check_factory(name, factory)
            if not _builtin(factory) and _buildable(factory):
                aggregator = _build(name, factory)
                check_methods(name, aggregator)
                one_step_check(aggregator, owner=f"compressor {name!r}")
        REGISTRY[name] = factory
        return factory
    return decorate


def check_factory(name: str, factory) -> None:
    """A callable whose parameters are all keyword-only (``def make(*, rank: int = 1)``)."""
    if not callable(factory):
        raise ValueError(f"compressor {name!r}: the factory {factory!r} is invalid; allowed: a function of "
                         "keyword-only options returning an Aggregator")
    positional = [p.name for p in inspect.signature(factory).parameters.values()
                  if p.kind not in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD)]
    if positional:
        raise ValueError(f"compressor {name!r}: factory {getattr(factory, '__name__', factory)!r} takes "
                         f"{positional} positionally; options must be keyword-only: def make(*, {positional[0]}=...)")


def check_methods(name: str, aggregator) -> None:
    """``init``, ``reduce``, ``bits_per_step`` exist and accept every call form in ``CALL_FORMS``."""
    for method, forms in CALL_FORMS.items():
        fn = getattr(aggregator, method, None)
        if fn is None or not callable(fn):
            raise ValueError(f"compressor {name!r}: {type(aggregator).__name__} has no method {method!r}; "
                             f"expected {EXPECTED[method]}")
        if getattr(fn, "__isabstractmethod__", False):
            raise ValueError(f"compressor {name!r}: {type(aggregator).__name__}.{method} is abstract; "
                             f"expected {EXPECTED[method]}")
        signature = inspect.signature(fn)
        for args, kwargs in forms:
            try:
                signature.bind(*args, **kwargs)
            except TypeError as error:
                shown = ", ".join([*map(str, args), *(f"{k}=..." for k in kwargs)])
                raise ValueError(f"compressor {name!r}: {type(aggregator).__name__}.{method}{signature} cannot be "
                                 f"called as {method}({shown}) ({error}); expected {EXPECTED[method]}") from None


def _builtin(factory) -> bool:
    return getattr(factory, "__module__", "").split(".")[0] == __name__.split(".")[0]


def _buildable(factory) -> bool:
    return all(p.default is not inspect.Parameter.empty for p in inspect.signature(factory).parameters.values()
               if p.kind == inspect.Parameter.KEYWORD_ONLY)


def _build(name: str, factory) -> Aggregator:
    aggregator = factory()
    if not isinstance(aggregator, Aggregator):
        raise ValueError(f"compressor {name!r}: the factory returned {type(aggregator).__name__}; expected an "
                         "instance of compressors.Aggregator (subclass it: see docs/writing_a_compressor.md)")
    return aggregator


def options_of(name: str) -> dict[str, object]:
    """The options a compressor accepts, with their defaults."""
    factory = _factory(name)
    return {p.name: p.default for p in inspect.signature(factory).parameters.values()
            if p.kind == inspect.Parameter.KEYWORD_ONLY}


def make(name: str, **options) -> Aggregator:
    """Build a registered aggregator; every invalid name or option raises ValueError naming it."""
    factory = _factory(name)
    check_known_options(f"compressor {name!r}", options, options_of(name))
    return factory(**options)


def _factory(name: str) -> Factory:
    if not isinstance(name, str) or name not in REGISTRY:
        hint = closest(name, REGISTRY) if isinstance(name, str) else ""
        raise ValueError(f"compressor: name={name!r} is invalid{hint}; allowed: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]
