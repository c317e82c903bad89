"""Experiments from TOML or JSON files.

A config is the fields of ``sim.Experiment`` at the top level, the compressor and task options as tables, and
an optional ``[sweep]`` table (``grid``: dotted key -> list of values, ``seeds``: list of integers)::

    task = "digits-mlp"
    workers = 8
    steps = 200
    [compressor]
    name = "powersgd"
    rank = 2
    [task_options]
    hidden = [64]
    [sweep]
    seeds = [0, 1, 2]
    [sweep.grid]
    "compressor.rank" = [1, 2, 4]

Unknown keys and values of the wrong type raise ValueError naming the key (``Experiment`` checks every field's
value; this module checks the keys and the sweep table). TOML has no null: leave a key out for its default.
A grid's values and the seeds must be distinct (a repeated one would run the same experiment twice).

``imports = ["my_tasks"]`` (top level) names modules that register your own tasks or compressors. Importing a
module runs its code, so a file alone never imports anything: the modules must be imported already, on the command
line with ``--import my_tasks`` (``python -m sim run|sweep``, ``python -m sim.launch``), in Python by importing them
first. ``load_config(..., allow_imports=True)`` in Python imports them for you (only for files you trust).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import compressors
from compressors.options import check_known_options, invalid
from compressors.serialization import loads_json
from compressors.spec import parse_spec, split_specs
from ..experiment import Experiment, NESTED_FIELDS

try:
    import tomllib  # Python >= 3.11
except ImportError:  # pragma: no cover - Python 3.10: the tomli backport has the same API, if installed
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

SWEEP_KEYS = ("grid", "seeds")
MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


@dataclass(frozen=True)
class Config:
    """An experiment plus the sweep its file asks for (an empty grid and ``(seed,)`` for a single run)."""
    experiment: Experiment
    grid: dict[str, list[Any]] = field(default_factory=dict)
    seeds: tuple[int, ...] = ()
    source: str = ""

    @property
    def sweep_seeds(self) -> tuple[int, ...]:
        return self.seeds or (self.experiment.seed,)


def read_mapping(path: str | Path) -> dict[str, Any]:
    """Parse a .toml or .json file into a dict; a ValueError names the file and the parse error."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config: {str(path)!r} is not a file")
    if path.suffix == ".toml" and tomllib is None:
        raise ValueError(f"config: reading {path} needs Python >= 3.11 (tomllib) or the tomli package; "
                         f"or write the config as .json")
    try:
        if path.suffix == ".toml":
            return tomllib.loads(path.read_text(encoding="utf-8"))
        if path.suffix == ".json":
            data = loads_json(path.read_text(encoding="utf-8"))  # nesting bounded
            if not isinstance(data, dict):
                raise ValueError("the top level must be an object")
            return data
    except (json.JSONDecodeError, ValueError, RecursionError) as error:  # RecursionError: TOML nested too deep
        raise ValueError(f"config: cannot parse {path}: {str(error) or type(error).__name__}") from None
    raise invalid("config", "suffix", path.suffix, "'.toml' or '.json'")


def from_mapping(data: Mapping[str, Any], source: str = "", allow_imports: bool = False) -> Config:
    """Validate keys, import ``imports``, split off ``sweep``, build the Experiment (which validates every value)."""
    fields = [f.name for f in dataclasses.fields(Experiment)]
    check_known_options("config", data, fields + ["sweep", "imports"])
    import_modules(data.get("imports", []), "config", "imports", allow=allow_imports)
    for table in NESTED_FIELDS:
        if table == "compressor" and isinstance(data.get(table), str):
            continue  # a spec string, e.g. compressor = "powersgd:rank=2"
        if table in data and not isinstance(data[table], Mapping):
            raise invalid("config", table, data[table], "a table (TOML [section] or JSON object)"
                          + (' or a spec string such as "powersgd:rank=2"' if table == "compressor" else ""))
    values = dict(data)
    values.pop("imports", None)
    sweep = values.pop("sweep", {})
    if "lr_milestones" in values and isinstance(values["lr_milestones"], list):
        values["lr_milestones"] = tuple(values["lr_milestones"])
    experiment = Experiment(**values)
    grid, seeds = parse_sweep(sweep, experiment)
    return Config(experiment, grid, seeds, source)


def parse_sweep(sweep: Any, experiment: Experiment) -> tuple[dict[str, list[Any]], tuple[int, ...]]:
    if not isinstance(sweep, Mapping):
        raise invalid("config", "sweep", sweep, "a table with 'grid' and/or 'seeds'")
    check_known_options("config.sweep", sweep, SWEEP_KEYS)
    grid = sweep.get("grid", {})
    if not isinstance(grid, Mapping):
        raise invalid("config.sweep", "grid", grid, 'a table of dotted key -> list, e.g. "compressor.rank" = [1, 2]')
    for key, values in grid.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise invalid("config.sweep.grid", key, values, "a non-empty list of values")
    check_compressor_grid("config.sweep.grid", experiment, grid)
    for key, values in grid.items():
        for value in values:  # each grid point must make a valid Experiment: fail before any run starts
            experiment.with_overrides({key: value})
        check_distinct("config.sweep.grid", key, values)
    seeds = sweep.get("seeds", ())
    if not isinstance(seeds, Sequence) or isinstance(seeds, str) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise invalid("config.sweep", "seeds", seeds, "a list of integers >= 0")
    check_distinct("config.sweep", "seeds", seeds)
    if seeds and "seed" in grid:
        raise invalid("config.sweep", "seeds", list(seeds), "absent when the grid sweeps 'seed' (give seeds once)")
    return {k: list(v) for k, v in grid.items()}, tuple(seeds)


GRID_SPECS_HINT = ("whole compressors instead, each with its own options, e.g. --grid "
                   "compressor=identity,powersgd:rank=1,powersgd:rank=2 (in a file: \"compressor\" = "
                   "[\"identity\", \"powersgd:rank=2\"]; in Python: grid={\"compressor\": [\"identity\", "
                   "\"powersgd:rank=2\"]})")


def check_compressor_grid(owner: str, base: Experiment, grid: Mapping[str, Sequence[Any]]) -> None:
    """A compressor option in a grid applies to every compressor of that grid, or the grid is refused: an option
    is never silently dropped, nor given to a compressor that does not take it. Whole compressors ("compressor":
    specs) carry their own options, so they combine with no "compressor.<option>" key."""
    options = [k for k in grid if k.startswith("compressor.") and k != "compressor.name"]
    if "compressor" in grid:
        for key in options + (["compressor.name"] if "compressor.name" in grid else []):
            raise invalid(owner, key, list(grid[key]), "absent when the grid names whole compressors ('compressor'): "
                          "put the option into each spec, e.g. powersgd:rank=2:warm_start=false")
        return
    if "compressor.name" not in grid:
        return
    for name in grid["compressor.name"]:
        accepted = compressors.options_of(name)  # an unknown name raises, naming it
        for key in options:
            if key.removeprefix("compressor.") not in accepted:
                raise invalid(owner, key, list(grid[key]), f"options that every compressor of the grid takes; "
                              f"{name!r} does not take {key.removeprefix('compressor.')!r} (its options: "
                              f"{', '.join(accepted) or 'none'}); grid " + GRID_SPECS_HINT)
        for option, value in base.compressor.items():
            if option != "name" and f"compressor.{option}" not in grid and option not in accepted:
                raise invalid(owner, "compressor.name", list(grid["compressor.name"]),
                              f"compressors that take the base compressor's option {option}={value!r} ({name!r} "
                              "does not); grid " + GRID_SPECS_HINT)


def check_distinct(owner: str, field: str, values: Sequence[Any]) -> None:
    """Refuse a repeated value: it would run (and pool, as if independent) the very same experiment twice."""
    seen: dict[str, Any] = {}
    for value in values:
        key = json.dumps(value, sort_keys=True, default=str)
        if key in seen:
            raise invalid(owner, field, list(values), f"distinct values ({value!r} is repeated)")
        seen[key] = value


def import_modules(names: Any, owner: str, field: str, allow: bool = True) -> list[str]:
    """Import each named module (they register tasks or compressors); a ValueError names a bad or missing one.

    ``allow=False``: import nothing; every module must already be imported (a file read from Python never runs
    code by itself)."""
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise invalid(owner, field, names, 'a list of module names, e.g. ["my_tasks"]')
    for name in names:
        if not isinstance(name, str) or not MODULE_NAME.match(name):
            raise invalid(owner, field, name, "a module name such as my_tasks or examples.own_model (no file paths)")
        if name in sys.modules:
            continue
        if not allow:
            raise invalid(owner, field, name, f"modules already imported: a file never imports code by itself; on the "
                          f"command line pass --import {name}, in Python import it first (importing runs the "
                          "module's code: only modules you trust)")
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise invalid(owner, field, name, f"an importable module ({error}; run from the folder that holds it, "
                          "or add that folder to PYTHONPATH)") from None
    return list(names)


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None, *, allow_imports: bool = False) -> Config:
    """A Config from a .toml or .json file; ``overrides`` (dotted keys, as ``--set``) apply before validation,
    so a command line can supply what the file lacks (e.g. ``task_options.data_dir``). ``allow_imports``: import
    the modules the file's ``imports`` names (otherwise they must be imported already)."""
    return from_mapping(apply_overrides(read_mapping(path), overrides or {}), source=str(path),
                        allow_imports=allow_imports)


def apply_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """{"compressor.rank": 4} sets data["compressor"]["rank"]; only compressor., task_options. and
    optimizer_options. nest. {"compressor": "powersgd:rank=2"} (a spec, ``compressors.spec``) replaces the
    whole compressor."""
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if not rest:
            out[head] = value
        elif head in NESTED_FIELDS:
            if head == "compressor" and isinstance(out.get(head), str):  # a spec string gets options added
                out[head] = parse_spec(out[head], "config", "compressor")
            nested = out.setdefault(head, {} if head == "task_options" else {"name": "identity"})
            if not isinstance(nested, dict):
                raise invalid("config", head, nested, "a table (TOML [section] or JSON object)")
            nested[rest] = value
        else:
            raise invalid("config", key, value, "dotted keys only under " + ", ".join(f"'{n}.'" for n in NESTED_FIELDS))
    return out


def load_experiment(path: str | Path) -> Experiment:
    return load_config(path).experiment


def parse_value(text: str) -> Any:
    """A command-line value: true/false -> bool, none/null -> None, [..] -> a JSON list, {..} -> a JSON object,
    then int, then float, else the string."""
    lowered = text.strip().lower()
    if lowered.startswith("["):
        try:
            return loads_json(text)
        except ValueError:
            raise ValueError(f"command line: {text!r} is invalid; allowed: a JSON list such as [64, 64]") from None
    if lowered.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(f"command line: {text!r} is invalid; allowed: a JSON object such as "
                             '{"name": "powersgd", "rank": 2}') from None
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_assignment(text: str, many: bool) -> tuple[str, Any]:
    """``"key=v"`` -> (key, value); with ``many``, ``"key=v1,v2"`` -> (key, [v1, v2])."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or not raw.strip():
        raise ValueError(f"command line: {text!r} is invalid; allowed: KEY=VALUE" + (",VALUE..." if many else ""))
    if many and key.strip() == "compressor":  # compressor specs: "identity,powersgd:rank=2,warm_start=false"
        return key.strip(), [parse_value(v) if v.startswith("{") else v for v in split_specs(raw)]
    if many:
        return key.strip(), [parse_value(v) for v in split_top_level(raw)]
    return key.strip(), parse_value(raw)


def split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets and braces: "1,[2,3],4" -> ["1", "[2,3]", "4"]."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += (char in "[{") - (char in "]}")
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        seeds = ()
    if not seeds or any(s < 0 for s in seeds):
        raise invalid("command line", "--seeds", text, "comma-separated integers >= 0, e.g. 0,1,2")
    check_distinct("command line", "--seeds", seeds)
    return seeds
