"""The registry-driven contract: every name in compressors.REGISTRY goes through the same battery.

The battery is ``compressors.testing`` (public: a user's compressor is checked with the same code through
``check_compressor``). Parametrized over the registry at collection time, so a compressor registered anywhere
in ``compressors`` is covered without touching this file. Each is built with its default options (plus the
one required choice some need, e.g. top-k's ``ratio``/``k``: ``testing.default_options``).
"""
from __future__ import annotations

import pytest
import torch

import compressors
from compressors import testing
from compressors.base import Aggregator, Reduced

NAMES = sorted(compressors.REGISTRY)


def build(name: str) -> Aggregator:
    return compressors.make(name, **testing.default_options(name))


def test_registry_is_not_empty():
    assert {"identity", "powersgd"} <= set(NAMES)


@pytest.mark.parametrize("check", list(testing.CHECKS))
@pytest.mark.parametrize("name", NAMES)
def test_battery(name, check):
    report = testing.check_compressor(name, checks=[check], **testing.default_options(name))
    assert set(report) == {check}
    if check == "theory_holds":  # a claim with a bound is checked, not skipped
        assert (report[check] == "ok") == (build(name).theory(testing.SHAPES).kind != "biased"), report


class _NoTheory(Aggregator):
    def init(self, shapes, workers, seed=0, *, dtype=torch.float32, device="cpu"):
        return ()

    def reduce(self, grads, state, comm, want_local=False):
        return Reduced({n: comm.all_reduce_mean(g) for n, g in grads.items()}, dict(grads) if want_local else None), state

    def bits_per_step(self, shapes, *, dtype=torch.float32):
        return sum(torch.Size(s).numel() for s in shapes.values()) * 32


def test_an_entry_without_a_theory_class_fails_the_battery():
    with pytest.raises(testing.ContractError, match="declares no theory"):
        testing.check_compressor(_NoTheory())
    # and nothing else is wrong with it
    report = testing.check_compressor(_NoTheory(), checks=[c for c in testing.CHECKS
                                                           if c not in ("theory_declared", "theory_holds")])
    assert set(report.values()) == {"ok"}
