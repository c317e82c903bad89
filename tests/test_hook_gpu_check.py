"""``make gpu-check``'s CPU fallback: every section runs (small sizes, 2 gloo processes) and its checks hold."""
from __future__ import annotations

import json

import pytest

from benchmarks import gpu_check

pytestmark = pytest.mark.distributed


def test_gpu_check_cpu_fallback_runs_and_passes(tmp_path):
    out = tmp_path / "gpu_check.json"
    results = gpu_check.main(["--cpu", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))  # written, the same figures
    assert results["about"]["device"].startswith("cpu")
    assert results["gpu_hook_gloo_w2_ok"] is True  # overlapped == synchronous bitwise, NaN step skipped everywhere
    assert results["gpu_check_ok"] is True
    for key in ("gpu_sim_overhead_ratio_resnet18_w2", "gpu_powersgd_vs_torch_hook_ratio_small_r2",
                "gpu_hook_gloo_w2_overlap_vs_sync"):
        assert results[key] > 0, key
