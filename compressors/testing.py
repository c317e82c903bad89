"""The contract battery every compressor must pass, public so that a user's compressor is checked the same way.

    from compressors.testing import check_compressor
    check_compressor("powersgd", rank=2)              # a registered name and its options
    check_compressor(make_mine, ratio=0.1)             # or any factory of keyword-only options
    check_compressor(MyAggregator())                   # or an aggregator

Each check raises ``ContractError`` (an ``AssertionError``) naming the compressor, the check and what
failed; ``check_compressor`` returns {check: "ok" or why it had nothing to check}. The checks
(``CHECKS``, in order; ``tests/test_contract.py`` runs every one on every registered compressor):

- ``theory_declared``: ``theory(shapes)`` returns a ``TheoryClaim`` with its constant (omega, delta).
- ``shapes_and_dtypes``: every tensor comes back in the caller's order, shape and dtype (float32, float64),
  finite.
- ``zero_gradients``: zero in, zero out, no NaN (a norm of zero must not be divided by).
- ``deterministic_and_pure``: same seed, bitwise-identical updates and states; neither the gradients nor
  the state passed in are modified.
- ``ledger_matches_bits_per_step``: the ledger of two steps (after any warm-up) holds 2 x ``bits_per_step``,
  every record priced for the right worker count, only all-reduces if ``all_reducible``, and no more than
  the dense float32 bits.
- ``theory_holds``: the declared class on fresh inputs (``theory.operators``): "exact" gives the exact mean;
  a deterministic contraction has ||C(x) - x||^2 <= (1 - delta) ||x||^2 on each input; one in expectation,
  and an unbiased operator (E C(x) = x, E||C(x) - x||^2 <= omega ||x||^2), are checked over
  ``FRESH_DRAWS`` first steps with seeds 0, 1, ... by Markov's inequality (a fixed seed list: never flaky;
  a wrong constant off by more than the Markov factor fails). Randomness must come from ``init``'s seed.
- ``error_feedback_composes``: ``reduce(..., want_local=True)`` gives each worker's message (k, *shape); an
  all-reducible compressor's update is the mean of those messages (a linear decoder); wrapped in
  ``ErrorFeedback`` ("averaged", and "local" when the decoder is linear), three steps conserve the signal:
  sum_t update_t + mean_i e_i = sum_t mean_i g_i (Stich & Karimireddy 2019; see ``error_feedback.py``).
- ``state_is_plain``: the state is nested tuples (NamedTuples), lists and str-keyed dicts of tensors and
  Python scalars: ``torch.save``-able, comparable, checkpointable.

``compressors.registration_check.one_step_check`` is the cheap subset ``compressors.register`` runs on a
user's compressor when it is registered.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping

import torch

from theory import operators
from . import registration_check
from .base import Aggregator, TheoryClaim, numel
from .comm import VirtualCollective
from .error_feedback import ErrorFeedback
from .registry import REGISTRY, make, options_of


#: The shapes the battery runs on: a matrix, a conv kernel (matrix view 4 x 18), a vector, a larger matrix.
SHAPES = {"w": (6, 5), "conv": (4, 2, 3, 3), "b": (6,), "big": (16, 12)}
WORKERS = 3
THEORY_KINDS = ("exact", "unbiased", "contractive", "nonexpansive", "biased")
FRESH_DRAWS = 100  # first steps with seeds 0..FRESH_DRAWS-1 for in-expectation claims
MARKOV = 200.0  # a correct claim fails a Markov check with probability <= 1/MARKOV per fresh seed list
# A value for options that have no usable default (None meaning "choose one", or no default at all).
REQUIRED_CHOICES = {"ratio": 0.25, "k": 4, "rank": 1, "levels": 4}


class ContractError(AssertionError):
    """A compressor broke the aggregator contract; the message names the check and what failed."""


# -- building -------------------------------------------------------------------------------------------------
def builder(factory_or_name, **options) -> tuple[str, Callable[[], Aggregator]]:
    """(a name for messages, a function building a fresh aggregator) from a registered name, a factory of
    keyword-only options, or an aggregator (then ``options`` must be empty)."""
    if isinstance(factory_or_name, str):
        if factory_or_name not in REGISTRY:
            make(factory_or_name)  # raises the registry's ValueError (closest name, allowed names)
        return factory_or_name, lambda: make(factory_or_name, **options)
    if isinstance(factory_or_name, Aggregator):
        if options:
            raise ValueError(f"check_compressor: options {sorted(options)} are invalid with an aggregator "
                             "instance; allowed: pass the factory or the registered name with its options")
        return repr(factory_or_name), lambda: factory_or_name
    if callable(factory_or_name):
        def build() -> Aggregator:
            agg = factory_or_name(**options)
            if not isinstance(agg, Aggregator):
                raise ContractError(f"{label}: the factory returned {type(agg).__name__}, not a compressors.Aggregator")
            return agg
        label = getattr(factory_or_name, "__name__", repr(factory_or_name))
        return label, build
    raise ValueError(f"check_compressor: factory_or_name={factory_or_name!r} is invalid; allowed: a registered "
                     "name, a factory of keyword-only options, or a compressors.Aggregator")


def default_options(name: str) -> dict:
    """Options for building a registered compressor with its defaults, plus a value for any option that has
    no usable default (``REQUIRED_CHOICES``; sparsifiers' "ratio or k": ratio)."""
    defaults = options_of(name)
    chosen = {}
    for option, default in defaults.items():
        if default is inspect.Parameter.empty:
            if option not in REQUIRED_CHOICES:
                raise ValueError(f"{name}: option {option!r} has no default and no value in REQUIRED_CHOICES")
            chosen[option] = REQUIRED_CHOICES[option]
    if "ratio" in defaults and "k" in defaults and defaults["ratio"] is None and defaults["k"] is None:
        chosen["ratio"] = REQUIRED_CHOICES["ratio"]
    return chosen


# -- helpers --------------------------------------------------------------------------------------------------
def random_grads(seed: int, shapes=SHAPES, workers: int = WORKERS, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """{name: (workers, *shape)} standard normal, drawn in float64 from a seeded generator, then cast."""
    return registration_check.random_grads(seed, shapes, workers, dtype)


def exact_mean(grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: g.mean(0) for n, g in grads.items()}


def warmup_steps(agg) -> int:
    """Dense steps of a ``Warmup`` wrapper (``start_compressing_after_num_steps``) before compression starts."""
    return int(getattr(agg, "steps", 0) or 0)


def run_steps(agg, grads_list, shapes=SHAPES, workers: int = WORKERS, seed: int = 0, dtype=torch.float32):
    """Feed gradient dicts to a fresh state on a fresh virtual collective: (updates, final state, comm)."""
    state = agg.init(shapes, workers=workers, seed=seed, dtype=dtype)
    comm = VirtualCollective(workers)
    updates = []
    for grads in grads_list:
        update, state = agg.aggregate(grads, state, comm)
        updates.append(update)
    return updates, state, comm


def clone_tree(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, dict):
        return {k: clone_tree(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        items = [clone_tree(v) for v in x]
        return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)
    return x


def equal_tree(a, b) -> bool:
    """Bitwise equality of nested states (tensors: dtype, shape and values; NaN never equals)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal_tree(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(equal_tree(x, y) for x, y in zip(a, b))
    return a == b


def _require(ok: bool, owner: str, check: str, message: str) -> None:
    if not ok:
        raise ContractError(f"{owner}: {check}: {message}")


# -- the checks -----------------------------------------------------------------------------------------------
def check_theory_declared(agg, shapes=SHAPES, workers=WORKERS, owner="compressor") -> TheoryClaim:
    check = "theory_declared"
    try:
        claim = agg.theory(shapes)
    except NotImplementedError as error:
        raise ContractError(f"{owner}: {check}: {agg!r} declares no theory class ({error}); implement "
                            "theory(shapes) -> TheoryClaim") from error
    _require(isinstance(claim, TheoryClaim), owner, check, f"theory() returned {claim!r}, not a TheoryClaim")
    _require(claim.kind in THEORY_KINDS, owner, check, f"kind {claim.kind!r} is not one of {THEORY_KINDS}")
    if claim.kind == "unbiased":
        _require(claim.omega is not None and math.isfinite(claim.omega) and claim.omega >= 0, owner, check,
                 f"an unbiased claim needs a finite omega >= 0, got {claim!r}")
    if claim.kind == "contractive":
        _require(claim.delta is not None and 0 < claim.delta <= 1, owner, check,
                 f"a contractive claim needs 0 < delta <= 1, got {claim!r}")
    if claim.kind == "exact":
        _require(claim.omega in (None, 0.0) and claim.delta in (None, 1.0), owner, check,
                 f"an exact claim has omega 0 and delta 1, got {claim!r}")
    if claim.kind == "nonexpansive":  # ||C(x) - x|| <= ||x|| for every x: delta = 0, stated by no number
        _require(claim.delta is None and claim.deterministic, owner, check,
                 f"a nonexpansive claim is deterministic and has no delta, got {claim!r}")
    return claim


def check_shapes_and_dtypes(agg, shapes=SHAPES, workers=WORKERS, owner="compressor") -> None:
    for dtype in (torch.float32, torch.float64):
        updates, _, _ = run_steps(agg, [random_grads(0, shapes, workers, dtype), random_grads(1, shapes, workers, dtype)],
                                  shapes, workers, dtype=dtype)
        for update in updates:
            _require(list(update) == list(shapes), owner, "shapes_and_dtypes",
                     f"returned tensors {list(update)}, expected {list(shapes)} in the caller's order")
            for n, s in shapes.items():
                _require(tuple(update[n].shape) == tuple(s), owner, "shapes_and_dtypes",
                         f"{n}: shape {tuple(update[n].shape)}, expected {tuple(s)}")
                _require(update[n].dtype == dtype, owner, "shapes_and_dtypes",
                         f"{n}: dtype {update[n].dtype} from {dtype} gradients")
                _require(bool(torch.isfinite(update[n]).all()), owner, "shapes_and_dtypes", f"{n}: non-finite update")


def check_zero_gradients(agg, shapes=SHAPES, workers=WORKERS, owner="compressor") -> None:
    zeros = {n: torch.zeros((workers, *s)) for n, s in shapes.items()}
    updates, _, _ = run_steps(agg, [zeros, zeros], shapes, workers)
    for update in updates:
        for n in shapes:
            _require(bool(torch.isfinite(update[n]).all()), owner, "zero_gradients", f"C(0) has NaN/inf in {n}")
            _require(int(torch.count_nonzero(update[n])) == 0, owner, "zero_gradients", f"C(0) != 0 in {n}")


def check_deterministic_and_pure(agg, shapes=SHAPES, workers=WORKERS, owner="compressor") -> None:
    check = "deterministic_and_pure"
    grads_list = [random_grads(s, shapes, workers) for s in range(3)]
    saved_grads = clone_tree(grads_list)
    first, state1, _ = run_steps(agg, grads_list, shapes, workers, seed=5)
    _require(equal_tree(grads_list, saved_grads), owner, check, "modified its input gradients")
    second, state2, _ = run_steps(agg, grads_list, shapes, workers, seed=5)
    _require(equal_tree(first, second), owner, check, "same seed, different updates")
    _require(equal_tree(state1, state2), owner, check, "same seed, different states")
    state = agg.init(shapes, workers=workers, seed=5)
    comm = VirtualCollective(workers)
    for grads in grads_list:
        saved_state = clone_tree(state)
        _, new_state = agg.aggregate(grads, state, comm)
        _require(equal_tree(state, saved_state), owner, check, "modified the state it was given (return a new one)")
        state = new_state


def check_ledger_matches_bits_per_step(agg, shapes=SHAPES, workers=WORKERS, owner="compressor") -> None:
    check = "ledger_matches_bits_per_step"
    grads = [random_grads(s, shapes, workers) for s in range(2)]
    state = agg.init(shapes, workers=workers, seed=0)
    for _ in range(warmup_steps(agg)):
        _, state = agg.aggregate(grads[0], state, VirtualCollective(workers))
    comm = VirtualCollective(workers)
    for g in grads:  # two steps: an alternating scheme averages over its cycle
        _, state = agg.aggregate(g, state, comm)
    declared = agg.bits_per_step(shapes)
    sent = sum(r.bits for r in comm.ledger)
    _require(math.isclose(sent, 2 * declared, rel_tol=1e-12), owner, check,
             f"the ledger of 2 steps holds {sent} bits, bits_per_step(shapes) declares {declared} per step")
    _require(declared > 0, owner, check, f"bits_per_step = {declared}: a compressor must send something")
    dense = sum(numel(s) for s in shapes.values()) * 32
    _require(declared <= dense, owner, check,
             f"sends {declared} bits per step, more than the dense float32 gradient ({dense}): a degenerate "
             "configuration")
    ops = {r.op for r in comm.ledger}
    if agg.all_reducible:
        _require(ops <= {"all_reduce"}, owner, check, f"all_reducible is True but it used {sorted(ops)}")
    _require(all(r.workers == workers for r in comm.ledger), owner, check,
             "a ledger record is priced for another worker count")


def check_theory_holds(agg, shapes=SHAPES, workers=WORKERS, owner="compressor") -> str:
    check = "theory_holds"
    claim = check_theory_declared(agg, shapes, workers, owner)
    if claim.kind == "exact":
        for seed in range(3):
            grads = random_grads(100 + seed, shapes, workers, torch.float64)
            (update,), _, _ = run_steps(agg, [grads], shapes, workers, seed=seed, dtype=torch.float64)
            for n, mean in exact_mean(grads).items():
                _require(torch.allclose(update[n], mean, rtol=1e-10, atol=1e-12), owner, check,
                         f"claims exact, but {n} differs from the exact mean by "
                         f"{float((update[n] - mean).abs().max()):.3g}")
        return "ok"
    if claim.kind == "biased":
        return "nothing to check: a 'biased' claim promises no bound"
    # One worker, first step: the update is C(x) itself (error-feedback memory is still zero).
    draws = 3 if claim.deterministic else FRESH_DRAWS
    x = random_grads(200, shapes, 1, torch.float64)
    norm2 = sum(float(g.pow(2).sum()) for g in x.values())
    total = {n: torch.zeros(s, dtype=torch.float64) for n, s in shapes.items()}
    squared = 0.0
    for seed in range(draws):
        inputs = random_grads(200 + seed, shapes, 1, torch.float64) if claim.deterministic else x
        (update,), _, _ = run_steps(agg, [inputs], shapes, 1, seed=seed, dtype=torch.float64)
        if claim.deterministic:
            cx = torch.cat([update[n].reshape(-1) for n in shapes])
            xs = torch.cat([inputs[n][0].reshape(-1) for n in shapes])
            delta = operators.delta_of(xs, cx)
            floor = claim.delta if claim.kind == "contractive" else 0.0  # nonexpansive: delta(x) >= 0
            _require(delta >= floor - 1e-9, owner, check,
                     f"claims {claim.kind} with delta={floor}, but delta(x) = {delta:.6g} on a fresh input")
            continue
        for n in shapes:
            total[n] += update[n]
        squared += sum(float((update[n] - x[n][0]).pow(2).sum()) for n in shapes)
    if claim.deterministic:
        return "ok"
    mean_error2 = squared / draws
    if claim.kind == "contractive":  # E||C(x) - x||^2 <= (1 - delta) ||x||^2
        _require(mean_error2 <= MARKOV ** 0.5 * (1 - claim.delta) * norm2, owner, check,
                 f"claims a contraction in expectation with delta={claim.delta}, but the mean ||C(x)-x||^2 over "
                 f"{draws} seeds is {mean_error2:.4g} > {MARKOV ** 0.5:.3g} (1 - delta) ||x||^2")
        return "ok"
    # unbiased: E||mean of N draws - x||^2 <= omega ||x||^2 / N and E||C(x) - x||^2 <= omega ||x||^2
    bias2 = sum(float((total[n] / draws - x[n][0]).pow(2).sum()) for n in shapes)
    _require(bias2 <= MARKOV * claim.omega * norm2 / draws, owner, check,
             f"claims unbiased with omega={claim.omega}, but the mean of {draws} draws is {bias2:.4g} (squared) "
             f"from x, above Markov's bound {MARKOV * claim.omega * norm2 / draws:.4g} (randomness must come "
             "from init's seed)")
    _require(mean_error2 <= MARKOV ** 0.5 * claim.omega * norm2, owner, check,
             f"claims omega={claim.omega}, but the mean ||C(x)-x||^2 is {mean_error2:.4g} > "
             f"{MARKOV ** 0.5:.3g} omega ||x||^2")
    return "ok"


def check_error_feedback_composes(agg, shapes=SHAPES, workers=WORKERS, owner="compressor") -> None:
    check = "error_feedback_composes"
    grads = random_grads(300, shapes, workers, torch.float64)
    state = agg.init(shapes, workers=workers, seed=0, dtype=torch.float64)
    comm = VirtualCollective(workers)
    reduced, _ = agg.reduce(grads, state, comm, want_local=True)
    _require(reduced.local is not None, owner, check, "reduce(..., want_local=True) returned local=None; "
             "error feedback needs each worker's own decompressed message")
    for n, s in shapes.items():
        _require(n in reduced.local and tuple(reduced.local[n].shape) == (workers, *s), owner, check,
                 f"local[{n!r}] must have shape {(workers, *s)} (one message per worker)")
    # A message in a 16-bit type is averaged in that type: linear up to its rounding (theory.operators).
    u = max((operators.unit_roundoff(getattr(torch, r.dtype)) for r in comm.ledger
             if getattr(torch, r.dtype, None) in (torch.float16, torch.bfloat16, torch.float32)), default=2.0 ** -53)
    tolerance = 1e-10 + 4 * workers * u  # relative to the largest message entry

    def close(a, b, scale):
        return float((a - b).abs().max()) <= tolerance * max(float(scale), 1e-30) if a.numel() else True

    linear = all(close(reduced.local[n].mean(0), reduced.update[n], reduced.local[n].abs().max()) for n in shapes)
    if agg.all_reducible:
        _require(linear, owner, check, "all_reducible, but the update is not the mean of the workers' messages")
    for mode in ("averaged", "local") if linear else ("averaged",):
        wrapped = ErrorFeedback(agg, mode)
        steps = [random_grads(310 + t, shapes, workers, torch.float64) for t in range(3)]
        updates, final, _ = run_steps(wrapped, steps, shapes, workers, dtype=torch.float64)
        for n in shapes:
            applied = sum(u[n] for u in updates) + final.memory[n].mean(0)
            signal = sum(g[n].mean(0) for g in steps)
            _require(close(applied, signal, 3 * sum(g[n].abs().max() for g in steps)), owner, check,
                     f"ErrorFeedback(mode={mode!r}) around it loses signal in {n}: sum of updates + mean memory "
                     f"differs from the sum of mean gradients by {float((applied - signal).abs().max()):.3g}")


PLAIN_SCALARS = (bool, int, float, str, type(None), torch.dtype)


def check_state_is_plain(agg, shapes=SHAPES, workers=WORKERS, owner="compressor") -> None:
    _, state, _ = run_steps(agg, [random_grads(0, shapes, workers)], shapes, workers)

    def walk(x, path: str) -> None:
        if isinstance(x, torch.Tensor) or isinstance(x, PLAIN_SCALARS):
            return
        if isinstance(x, dict):
            for k, v in x.items():
                _require(isinstance(k, str), owner, "state_is_plain", f"state{path} has a non-str key {k!r}")
                walk(v, f"{path}[{k!r}]")
            return
        if isinstance(x, (tuple, list)):
            for i, v in enumerate(x):
                walk(v, f"{path}.{x._fields[i]}" if hasattr(x, "_fields") else f"{path}[{i}]")
            return
        raise ContractError(f"{owner}: state_is_plain: state{path} is a {type(x).__name__}; allowed: tensors, "
                            "Python scalars, and tuples/NamedTuples, lists and str-keyed dicts of them")

    walk(state, "")


CHECKS: dict[str, Callable] = {
    "theory_declared": check_theory_declared,
    "shapes_and_dtypes": check_shapes_and_dtypes,
    "zero_gradients": check_zero_gradients,
    "deterministic_and_pure": check_deterministic_and_pure,
    "ledger_matches_bits_per_step": check_ledger_matches_bits_per_step,
    "theory_holds": check_theory_holds,
    "error_feedback_composes": check_error_feedback_composes,
    "state_is_plain": check_state_is_plain,
}


def check_compressor(factory_or_name, *, shapes: Mapping[str, tuple[int, ...]] | None = None,
                     workers: int = WORKERS, checks=None, **options) -> dict[str, str]:
    """Run the contract battery (``CHECKS``, or the named subset ``checks``) on a compressor.

    ``factory_or_name``: a registered name, a factory (called with ``options``), or an aggregator.
    Returns {check: "ok" or why there was nothing to check}; raises ``ContractError`` at the first failure.
    """
    owner, build = builder(factory_or_name, **options)
    shapes = {str(n): tuple(int(d) for d in s) for n, s in (shapes or SHAPES).items()}
    names = list(CHECKS) if checks is None else list(checks)
    for name in names:
        if name not in CHECKS:
            raise ValueError(f"check_compressor: checks entry {name!r} is invalid; allowed: {', '.join(CHECKS)}")
    report = {}
    for name in names:
        outcome = CHECKS[name](build(), shapes, workers, owner)
        report[name] = outcome if isinstance(outcome, str) else "ok"
    return report
