"""A results directory that survives interruption: one folder per finished run, written as it completes.

Layout::

    DIR/runs/<run_id>/history.csv   the run's history, one row per logged step (tidy: one column per metric)
    DIR/runs/<run_id>/record.json   config, seed, grid point, package versions, git commit, summary

``run_id`` is a readable prefix plus a hash of the full experiment (seed included; Experiment fields added
later count only when they differ from their default), so the same experiment always lands in the same folder. Both files are written atomically (temporary file + rename), history first;
``record.json`` is the completion marker (a record that is not JSON, or JSON of another shape, or a history
that is not a readable table, marks the run incomplete, never an error). A killed sweep started again finds
every run whose record exists and matches its config, skips it, and redoes the rest: the final table is row
for row the uninterrupted one (runs are deterministic given their seed).

``load_results(DIR)`` concatenates every complete run into one DataFrame.
"""
from __future__ import annotations

import hashlib
import json
import math
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd

from ..checkpoint_schema import LATER_FIELDS
from ..experiment import Experiment, NESTED_FIELDS
from ..tasks import TASK_REGISTRY
from .io import write_atomically, write_text_atomically

FORMAT = 1
HISTORY, RECORD = "history.csv", "record.json"
CHECKPOINTS = "checkpoints"  # a run in progress: its sim.checkpoint files, removed once the run is stored


# -- identity of a run ----------------------------------------------------------------------------------------
def canonical_config(experiment: Experiment) -> dict[str, Any]:
    """The experiment as plain JSON values (tuples -> lists), the same after a JSON round trip."""
    return json.loads(json.dumps(experiment.to_dict(), sort_keys=True, default=str))


def identity(config: Mapping[str, Any]) -> dict[str, Any]:
    """A canonical config without the Experiment fields added later (``LATER_FIELDS``) that hold their default:
    a run keeps the id and the completeness it had before those fields existed (the record of a run written
    then lacks them, and it behaved as their defaults)."""
    defaults = json.loads(json.dumps(LATER_FIELDS, default=str))
    return {k: v for k, v in config.items() if not (k in defaults and v == defaults[k])}


def run_id(experiment: Experiment) -> str:
    digest = hashlib.sha256(json.dumps(identity(canonical_config(experiment)), sort_keys=True).encode()
                            ).hexdigest()[:12]
    name = str(experiment.compressor.get("name", "run")).replace("/", "_")
    return f"{experiment.task}-{name}-seed{experiment.seed}-{digest}"


def label(overrides: Mapping[str, Any], experiment: Experiment, dense: bool = False) -> str:
    """A configuration's name without its seed: the grid point ("rank=2, warm_start=False"), or the compressor;
    " (dense)" appended when ``dense``: the configuration sends at least the dense bits (``compressors.degenerate``)."""
    suffix = " (dense)" if dense else ""
    point = {k: v for k, v in overrides.items() if k != "seed"}
    if point:
        return ", ".join(f"{k.removeprefix('compressor.')}={v}" for k, v in point.items()) + suffix
    options = ", ".join(f"{k}={v}" for k, v in experiment.compressor.items() if k != "name")
    return (f"{experiment.compressor['name']}({options})" if options else str(experiment.compressor["name"])) + suffix


def sends_dense(result) -> bool:
    """A compressed run (not the identity baseline) that sends at least the dense bits per step."""
    return (result.experiment.compressor.get("name") != "identity"
            and result.bits_per_step >= result.dense_bits_per_step > 0)


def flatten(config: Mapping[str, Any]) -> dict[str, Any]:
    """{"compressor": {"rank": 2}} -> {"compressor.rank": 2} (one level, as Experiment.with_overrides keys)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if key in NESTED_FIELDS and isinstance(value, Mapping):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


# -- provenance -----------------------------------------------------------------------------------------------
def package_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for package in ("torch", "numpy", "pandas", "compressed-sgd-sandbox"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


@lru_cache(maxsize=1)
def git_commit() -> dict[str, Any]:
    """HEAD of the checkout this package runs from and whether tracked files differ from it (None outside git)."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
        return {"commit": commit, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


# -- writing --------------------------------------------------------------------------------------------------
def reports_perplexity(task: str) -> bool:
    return bool(getattr(TASK_REGISTRY.get(task), "reports_perplexity", False))


def history_table(history: pd.DataFrame, experiment: Experiment) -> pd.DataFrame:
    """The history as stored: language-model tasks get test_perplexity = exp(test_loss) (nats per token)."""
    table = history.copy()
    if reports_perplexity(experiment.task) and "test_loss" in table:
        table["test_perplexity"] = table["test_loss"].map(lambda v: math.exp(v) if v == v else math.nan)
    return table


class ResultsStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.runs = self.root / "runs"

    def folder(self, experiment: Experiment) -> Path:
        return self.runs / run_id(experiment)

    def is_complete(self, experiment: Experiment) -> bool:
        folder = self.folder(experiment)
        record = read_record(folder)
        return (record is not None and identity(record["config"]) == identity(canonical_config(experiment))
                and read_history(folder) is not None)

    def write(self, experiment: Experiment, result, overrides: Mapping[str, Any] | None = None,
              index: int = 0) -> Path:
        """Store one finished run: history first, then the record that marks it complete."""
        overrides = dict(overrides or {})
        folder = self.folder(experiment)
        history = history_table(result.history, experiment)
        write_atomically(folder / HISTORY, lambda tmp: history.to_csv(tmp, index=False))
        record = {
            "format": FORMAT,
            "run_id": folder.name,
            "index": index,
            "label": label(overrides, experiment, dense=sends_dense(result)),
            "overrides": overrides,
            "seed": experiment.seed,
            "config": canonical_config(experiment),
            "versions": package_versions(),
            "git": git_commit(),
            "summary": summary(result, history),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_text_atomically(folder / RECORD, json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
        return folder


def summary(result, history: pd.DataFrame) -> dict[str, Any]:
    out = {"rows": len(history), "wall_seconds": round(result.wall_seconds, 3),
           "bits_per_step": result.bits_per_step, "dense_bits_per_step": result.dense_bits_per_step,
           "compression_ratio": result.compression_ratio}
    for column in ("train_loss", "test_loss", "test_accuracy", "test_perplexity", "val_loss", "val_accuracy", "bits",
                   "sim_time"):
        if column in history:
            values = history[column].dropna()
            out[f"final_{column}"] = float(values.iloc[-1]) if len(values) else None
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


#: The fields a complete run's record.json must hold, with their JSON types (the rest is informative).
RECORD_FIELDS = {"run_id": str, "index": int, "label": str, "overrides": dict, "seed": int, "config": dict}


def read_record(folder: Path) -> dict[str, Any] | None:
    """The run's record, or None when the run is incomplete: no record, unreadable or invalid JSON, or JSON of
    another shape (a missing or mistyped field of ``RECORD_FIELDS``, a run_id that is not the folder's)."""
    try:
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("run_id") != folder.name:
        return None
    if not all(type(record.get(key)) is kind for key, kind in RECORD_FIELDS.items()):
        return None
    if not all(isinstance(k, str) for k in record["overrides"]):
        return None
    return record


def read_history(folder: Path) -> pd.DataFrame | None:
    """The run's history.csv, or None when it is missing or not a readable table."""
    try:
        return pd.read_csv(folder / HISTORY)
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return None


# -- reading --------------------------------------------------------------------------------------------------
def load_results(root: str | Path, run_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """Every complete run under ``root`` (or only ``run_ids``, in that order) as one tidy DataFrame.

    Columns: the history's (step, lr, train_loss, test_loss, test_accuracy, bits, ...), then one column per
    grid key of any loaded run (its value from that run's config, so runs outside a sweep get it too),
    ``seed``, ``run`` (the configuration's label, seeds pooled) and ``run_id``. Runs are ordered by their
    position in the sweep that produced them, then by id. Incomplete runs (no valid record or history) are
    ignored.
    """
    runs = Path(root) / "runs"
    if not Path(root).is_dir():
        raise ValueError(f"load_results: {str(root)!r} is not a directory (a results folder from "
                         f"`python -m sim sweep ... --out DIR` or sim.workflow.store.sweep_to_dir)")
    if run_ids is None:
        folders = sorted(p for p in runs.glob("*") if p.is_dir() and not p.name.startswith("."))
    else:
        folders = [runs / r for r in run_ids]
    loaded = []
    for folder in folders:
        record = read_record(folder)
        history = read_history(folder) if record is not None else None
        if history is None:  # incomplete: redone by a sweep started again
            continue
        loaded.append((record, history))
    if run_ids is None:
        loaded.sort(key=lambda item: (item[0].get("index", 0), item[0]["run_id"]))
    if not loaded:
        return pd.DataFrame()
    keys = list(dict.fromkeys(k for record, _ in loaded for k in record.get("overrides", {}) if k != "seed"))
    tables = []
    for record, history in loaded:
        flat = flatten(record["config"])
        for key in keys:
            history[key] = [flat.get(key)] * len(history)
        history["seed"] = record["seed"]
        history["run"] = record["label"]
        history["run_id"] = record["run_id"]
        tables.append(history)
    return pd.concat(tables, ignore_index=True)
