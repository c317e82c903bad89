"""sim.allocator.keep_freed_memory: freed big tensors stay with the process (for reuse) instead of going back to
the OS. Each case runs in a fresh interpreter: the setting is process-wide and must not leak into the tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sim.allocator import is_glibc

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, resource, sys, torch
import sim.allocator
applied = sim.allocator.keep_freed_memory() if sys.argv[1] == "keep" else None
def cycle():  # what a simulated step does to a per-worker tensor: a fresh 64 MB block, written, then freed
    x = torch.ones(16 * 2**20)
    del x
for _ in range(2):  # the heap reaches its steady size
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    cycle()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faulted_mb_per_cycle": faults * resource.getpagesize() / 2**20 / 20}))
"""


def _run(mode: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", CHILD, mode], env=env, check=True, capture_output=True, text=True,
                         timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not (sys.platform.startswith("linux") and is_glibc()), reason="glibc's mallopt only")
def test_keep_freed_memory_stops_page_faulting_a_reused_64mb_block():
    default, kept = _run("default"), _run("keep")
    # glibc as is: every 64 MB block is a fresh mmap whose pages fault in (zeroed by the kernel) when written
    assert default["faulted_mb_per_cycle"] > 48
    # after keep_freed_memory(): the block comes from the heap, freed memory stays, the next cycle reuses it
    assert kept["applied"] is True
    # (a cycle now and then may still grow the heap when a small allocation lands above the freed block)
    assert kept["faulted_mb_per_cycle"] < 12
