"""The registry-driven contract: every name in compressors.REGISTRY goes through the same battery.

Parametrized over the registry at collection time, so a compressor registered anywhere in ``compressors``
is covered without touching this file. Each is built with its default options (plus the one required choice
some need, e.g. top-k's ``ratio``/``k``).
"""
from __future__ import annotations

import inspect
import math

import pytest
import torch

import compressors
from compressors.base import Aggregator, Reduced, TheoryClaim
from reference import exact_mean, run_steps
from sim.collective import VirtualCollective

SHAPES = {"w": (6, 5), "conv": (4, 2, 3, 3), "b": (6,), "big": (16, 12)}
WORKERS = 3
THEORY_KINDS = ("exact", "unbiased", "contractive", "nonexpansive", "biased")
# A value for options that have no usable default (None meaning "choose one", or no default at all).
REQUIRED_CHOICES = {"ratio": 0.25, "k": 4, "rank": 1, "levels": 4}


def build(name: str) -> Aggregator:
    defaults = compressors.options_of(name)
    chosen = {}
    for option, default in defaults.items():
        if default is inspect.Parameter.empty:
            assert option in REQUIRED_CHOICES, f"{name}: required option {option!r} has no test value"
            chosen[option] = REQUIRED_CHOICES[option]
    if "ratio" in defaults and "k" in defaults and defaults["ratio"] is None and defaults["k"] is None:
        chosen["ratio"] = REQUIRED_CHOICES["ratio"]  # "ratio or k": exactly one must be given
    return compressors.make(name, **chosen)


def grads_for(seed: int, dtype=torch.float32, workers=WORKERS, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn((workers, *s), generator=gen, dtype=torch.float64).to(dtype) for n, s in shapes.items()}


def run(agg, grads_list, seed=0, dtype=torch.float32, workers=WORKERS, shapes=SHAPES):
    return run_steps(agg, grads_list, shapes, workers, seed=seed, dtype=dtype)


def clone_tree(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, dict):
        return {k: clone_tree(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        items = [clone_tree(v) for v in x]
        if hasattr(x, "_fields"):
            return type(x)(*items)
        return type(x)(items)
    return x


def equal_tree(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal_tree(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(equal_tree(x, y) for x, y in zip(a, b))
    return a == b


def check_declares_theory(agg: Aggregator, shapes) -> TheoryClaim:
    """Every compressor must say which operator class it is in; raising (the base default) fails."""
    try:
        claim = agg.theory(shapes)
    except NotImplementedError as error:
        raise AssertionError(f"{agg!r} declares no theory class: {error}") from error
    assert isinstance(claim, TheoryClaim), f"{agg!r}.theory() returned {claim!r}, not a TheoryClaim"
    assert claim.kind in THEORY_KINDS, claim
    if claim.kind == "unbiased":
        assert claim.omega is not None and math.isfinite(claim.omega) and claim.omega >= 0, claim
    if claim.kind == "contractive":
        assert claim.delta is not None and 0 < claim.delta <= 1, claim
    if claim.kind == "exact":
        assert claim.omega in (None, 0.0) and claim.delta in (None, 1.0), claim
    if claim.kind == "nonexpansive":  # delta = 0: no contraction may be implied by a number
        assert claim.delta is None and claim.deterministic, claim
    return claim


NAMES = sorted(compressors.REGISTRY)


def test_registry_is_not_empty():
    assert {"identity", "powersgd"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_declares_a_theory_class(name):
    check_declares_theory(build(name), SHAPES)


def test_an_entry_without_a_theory_class_fails_the_battery():
    class NoTheory(Aggregator):
        def init(self, shapes, workers, seed=0, dtype=torch.float32, device="cpu"):
            return ()

        def reduce(self, grads, state, comm, want_local=False):
            return Reduced({n: comm.all_reduce_mean(g) for n, g in grads.items()}, None), state

        def bits_per_step(self, shapes, dtype=torch.float32):
            return 0

    with pytest.raises(AssertionError, match="declares no theory"):
        check_declares_theory(NoTheory(), SHAPES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_and_dtype_kept(name, dtype):
    agg = build(name)
    updates, _, _ = run(agg, [grads_for(0, dtype), grads_for(1, dtype)], dtype=dtype)
    for update in updates:
        assert list(update) == list(SHAPES), "every tensor, in the caller's order"
        for n, s in SHAPES.items():
            assert tuple(update[n].shape) == s, (n, update[n].shape)
            assert update[n].dtype == dtype, (n, update[n].dtype)
            assert torch.isfinite(update[n]).all(), n


@pytest.mark.parametrize("name", NAMES)
def test_zero_in_zero_out(name):
    agg = build(name)
    zeros = {n: torch.zeros((WORKERS, *s)) for n, s in SHAPES.items()}
    updates, state, _ = run(agg, [zeros, zeros])
    for update in updates:
        for n in SHAPES:
            assert torch.isfinite(update[n]).all(), f"{name}: C(0) has NaN/inf in {n}"
            assert torch.count_nonzero(update[n]) == 0, f"{name}: C(0) != 0 in {n}"


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_per_seed_and_pure(name):
    agg = build(name)
    grads_list = [grads_for(s) for s in range(3)]
    saved_grads = clone_tree(grads_list)
    first, state1, _ = run(agg, grads_list, seed=5)
    second, state2, _ = run(agg, grads_list, seed=5)
    assert equal_tree(first, second), f"{name}: same seed, different updates"
    assert equal_tree(state1, state2), f"{name}: same seed, different states"
    assert equal_tree(grads_list, saved_grads), f"{name}: mutated its input gradients"
    # the state passed in is not mutated either (explicit, returned state)
    state = agg.init(SHAPES, workers=WORKERS, seed=5)
    comm = VirtualCollective(WORKERS)
    for grads in grads_list:
        saved_state = clone_tree(state)
        _, new_state = agg.aggregate(grads, state, comm)
        assert equal_tree(state, saved_state), f"{name}: mutated the state it was given"
        state = new_state


@pytest.mark.parametrize("name", NAMES)
def test_ledger_agrees_with_bits_per_step(name):
    agg = build(name)
    _, _, comm = run(agg, [grads_for(0), grads_for(1)])  # two steps: alternating schemes average over a cycle
    declared = agg.bits_per_step(SHAPES)
    assert sum(r.bits for r in comm.ledger) == pytest.approx(2 * declared, rel=1e-12), name
    dense = sum(math.prod(s) for s in SHAPES.values()) * 32
    assert declared > 0
    assert dense / declared >= 1.0, f"{name}: compression ratio {dense / declared} < 1"
    if agg.all_reducible:
        assert {r.op for r in comm.ledger} == {"all_reduce"}, f"{name}: all_reducible but used {set(r.op for r in comm.ledger)}"
    assert all(r.workers == WORKERS for r in comm.ledger)


@pytest.mark.parametrize("name", NAMES)
def test_class_claim_on_a_single_step(name):
    # First step (error-feedback memory still zero): an "exact" claim must give the mean of W workers; a
    # deterministic contraction (or a nonexpansive claim, delta = 0) must hold on one worker, where the update is
    # C(x) itself. (Unbiasedness, in-expectation claims and adversarial inputs: tests/test_theory_adversarial.py.)
    agg = build(name)
    claim = check_declares_theory(agg, SHAPES)
    if claim.kind == "exact":
        grads = grads_for(4, torch.float64)
        (update,), _, _ = run(agg, [grads], dtype=torch.float64)
        mean = exact_mean(grads)
        for n in SHAPES:
            assert torch.allclose(update[n], mean[n], rtol=1e-10, atol=1e-12), f"{name}: claims exact, {n} differs"
    elif claim.kind in ("contractive", "nonexpansive") and claim.deterministic:
        grads = grads_for(3, torch.float64, workers=1)
        (update,), _, _ = run(agg, [grads], dtype=torch.float64, workers=1)
        x2 = sum(float(g.pow(2).sum()) for g in grads.values())
        err2 = sum(float((update[n] - grads[n][0]).pow(2).sum()) for n in SHAPES)
        delta = claim.delta if claim.kind == "contractive" else 0.0
        assert err2 <= (1 - delta) * x2 * (1 + 1e-9), f"{name}: ||C(x)-x||^2 = {err2} > (1-delta)||x||^2"
