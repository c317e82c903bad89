"""sim.plot draws headless (Agg) by default, but never switches a backend the caller already chose: a notebook's
inline backend must keep showing every later figure after a sim.plot call."""
from __future__ import annotations

import subprocess
import sys

DRAW = ("import pandas as pd, sim; "
        "rows = [{'label': l, 'seed': s, 'step': 1, 'test_accuracy': 0.5 + 0.1 * s + d + 0.001 * s * (l == 'a')} "
        "for l, d in (('exact', 0.0), ('a', 0.02)) for s in range(3)]; "
        "sim.plot.plot_differences(sim.compare(pd.DataFrame(rows), baseline='exact')); ")


def backend_after(prelude: str) -> str:
    code = prelude + DRAW + "import matplotlib; print(matplotlib.get_backend().lower())"
    env_free_of_backend = {"PYTHONPATH": ":".join(sys.path), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env_free_of_backend,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_a_backend_chosen_before_pyplot_was_imported_is_kept():
    assert backend_after("import matplotlib; matplotlib.use('svg'); import matplotlib.pyplot; ") == "svg"


def test_without_pyplot_imported_the_plot_is_headless():
    assert backend_after("") == "agg"
