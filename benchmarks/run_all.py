"""``make bench``: every benchmark, a table each, ``benchmarks/results.json`` (flat metric -> value) and the
results section of BENCHMARKS.md rewritten with the same figures and the machine they came from.

    python -m benchmarks.run_all            # the full run (about 10 minutes on 2 cores)
    python -m benchmarks.run_all --quick    # fewer repetitions (a smoke run)
    python -m benchmarks.run_all --only overhead torch_hook ddp_hook
    python -m benchmarks.run_all --threads 2  # intra-op threads of every timed side (default 1)
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import time

import torch

from .timing import table

BENCHMARKS = ("optimizations", "overhead", "vmap_vs_loop", "torch_hook", "ddp_hook", "sim_vs_real", "memory",
              "shaped_link")
#: metric -> (comparison, target) checked at the end.
TARGETS = {"sim_overhead_ratio_w16": ("<=", 2.0), "vmap_vs_loop_speedup_w16": (">=", 10.0),
           "default_engine_vs_loop_speedup_w16": (">=", 0.95),
           "powersgd_vs_torch_hook_ratio_resnet18_r2": ("<=", 1.0), "sim_vs_real_speedup_w4": (">=", 5.0),
           "ddp_hook_vs_torch_hook_step_ratio": ("<=", 1.0),
           "forecast_time_to_accuracy_max_rel_error": ("<=", 0.20)}
HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results.json")
MARKDOWN = os.path.join(os.path.dirname(HERE), "BENCHMARKS.md")
BEGIN, END = "<!-- results:begin (written by make bench) -->", "<!-- results:end -->"


def machine() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "gpu": "none (CPU only)",
            "load_average_at_start": round(load, 1), "date": datetime.date.today().isoformat()}


def verdicts(metrics: dict[str, float]) -> list[list[object]]:
    rows = []
    for name, (op, target) in TARGETS.items():
        value = metrics.get(name)
        ok = value is not None and (value <= target if op == "<=" else value >= target)
        rows.append([name, value, f"{op} {target}", "met" if ok else "NOT met"])
    return rows


def results_sections(text: str) -> dict[str, str]:
    """The ``#### name`` tables of the results section in ``text`` (name -> table text)."""
    if BEGIN not in text or END not in text:
        return {}
    body = text.split(BEGIN, 1)[1].split(END, 1)[0]
    sections = {}
    for chunk in body.split("\n#### ")[1:]:
        name, _, rest = chunk.partition("\n")
        sections[name.strip()] = rest.strip("\n")
    return sections


def write_markdown(about: dict[str, object], tables: dict[str, str], rows: list[list[object]],
                   partial: list[str] | None = None) -> None:
    """Rewrite the results section. A partial run (``partial``: the benchmarks it ran) keeps the other
    benchmarks' tables and the full run's machine line, and says which tables it replaced, on what machine."""
    text = open(MARKDOWN).read() if os.path.exists(MARKDOWN) else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    old_body, tail = rest.split(END, 1)
    machine_line = "Machine: " + ", ".join(f"{k} {v}" for k, v in about.items())
    lines = [machine_line]
    if partial:
        kept = [line for line in old_body.splitlines() if line.startswith(("Machine:", "Partial run"))]
        others = [line for line in kept if not line.startswith(f"Partial run (--only {' '.join(partial)})")]
        lines = others + [f"Partial run (--only {' '.join(partial)}): {machine_line[len('Machine: '):]}"]
        tables = {**results_sections(text), **tables}
    section = [BEGIN, ""] + [line + "\n" for line in lines] + [table(["metric", "value", "target", ""], rows), ""]
    for name, body in tables.items():
        section += [f"#### {name}", "", body, ""]
    section.append(END)
    with open(MARKDOWN, "w") as f:
        f.write(head + "\n".join(section) + tail)


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, help="run only these benchmarks")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads for every timed side (default 1: see BENCHMARKS.md, 'Threads')")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    about = machine()
    print("machine:", about, flush=True)
    metrics: dict[str, float] = {}
    tables: dict[str, str] = {}
    if args.only and os.path.exists(RESULTS):  # a partial run updates the previous figures
        metrics = json.load(open(RESULTS))
    started = time.perf_counter()
    for name in args.only or BENCHMARKS:
        t0 = time.perf_counter()
        print(f"[{name}]", flush=True)
        found, text = importlib.import_module(f"benchmarks.{name}").run(quick=args.quick)
        metrics.update(found)
        tables.update(text)
        print(f"[{name}] {time.perf_counter() - t0:.0f} s", flush=True)
    if not args.only:  # a partial run keeps the full run's wall time
        metrics["bench_wall_seconds"] = round(time.perf_counter() - started, 1)
    with open(RESULTS, "w") as f:
        json.dump(metrics, f, indent=1, sort_keys=True)
    rows = verdicts(metrics)
    print(table(["metric", "value", "target", ""], rows))
    write_markdown(about, tables, rows, partial=args.only)
    return metrics


if __name__ == "__main__":
    main()
