"""Every notebook runs top to bottom in smoke mode (SMOKE=1), in a kernel on this interpreter (the venv).

The kernel is started as ``sys.executable -m ipykernel_launcher``, so no kernelspec needs installing; the
working directory is ``notebooks/`` so ``_common`` imports. A failing cell fails the test with its traceback.
The committed notebooks are executed in full mode; this also checks they carry their outputs and plots.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
from jupyter_client import KernelManager  # noqa: E402
from jupyter_client.kernelspec import KernelSpec  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ["01_rank_vs_convergence", "02_warm_start_and_power_iterations", "03_error_feedback",
         "04_compressor_zoo", "05_cost_model_what_if", "06_sim_vs_real", "07_paper_tables", "08_rank_over_time"]


class ThisInterpreterKernel(KernelManager):
    """A kernel on the interpreter running the tests (never a kernelspec found on the machine)."""

    @property
    def kernel_spec(self):
        return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                          display_name="python3 (tests)", language="python")


def execute(path: Path, smoke: bool, timeout: int = 600):
    """Execute a notebook in place of memory; returns the executed NotebookNode."""
    notebook = nbformat.read(path, as_version=4)
    env = {**os.environ, "SMOKE": "1" if smoke else "0", "PYTHONHASHSEED": "0", "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    manager = ThisInterpreterKernel()
    client = nbclient.NotebookClient(notebook, km=manager, timeout=timeout, resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute(env=env)
    return notebook


def has_png(notebook) -> bool:
    return any("image/png" in out.get("data", {}) for cell in notebook.cells if cell.cell_type == "code"
               for out in cell.get("outputs", []))


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_in_smoke_mode(name):
    path = NOTEBOOKS / f"{name}.ipynb"
    assert path.exists(), f"missing notebook {path}"
    executed = execute(path, smoke=True)
    errors = [out for cell in executed.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
              if out.get("output_type") == "error"]
    assert not errors
    assert has_png(executed), f"{name}: no figure was produced"


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_is_executed_with_plots_and_conclusion(name):
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code), f"{name}: not executed in full"
    assert has_png(notebook), f"{name}: committed without its plots"
    assert not any(out.get("output_type") == "error" for c in code for out in c.get("outputs", []))
    last = notebook.cells[-1]
    assert last.cell_type == "markdown" and "conclusion" in last.source.lower() and "PLACEHOLDER" not in last.source
