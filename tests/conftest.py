"""Shared test settings: bounded hypothesis runs (the whole suite must stay within minutes on 2 cores).

Profiles: "default" (small, deterministic derandomized examples so CI never flakes) and "thorough"
(HYPOTHESIS_PROFILE=thorough, more examples, for a local deep run). deadline=None: the first call of a
torch kernel can be slow (lazy init), which is not a failure.
"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", max_examples=10, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("thorough", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
