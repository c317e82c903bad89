"""Shared test settings: bounded hypothesis runs (the whole suite must stay within minutes on 2 cores), and the
checkpoint folders the security and reliability tests tamper with (``written``, ``copy``).

Profiles: "default" (small, deterministic derandomized examples so CI never flakes) and "thorough"
(HYPOTHESIS_PROFILE=thorough, more examples, for a local deep run). deadline=None: the first call of a
torch kernel can be slow (lazy init), which is not a failure.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

import sim
from reference import CHECKPOINTED

settings.register_profile(
    "default", max_examples=10, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("thorough", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """A folder of valid checkpoints (steps 4 and 6) of ``reference.CHECKPOINTED``, written once per module."""
    directory = tmp_path_factory.mktemp("written")
    sim.run(CHECKPOINTED, checkpoint_dir=directory, checkpoint_every=2)
    return directory


@pytest.fixture
def copy(written, tmp_path) -> Path:
    """A copy of ``written`` to tamper with."""
    shutil.copytree(written, tmp_path / "ckpt")
    return tmp_path / "ckpt"
