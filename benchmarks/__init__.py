"""Side-by-side benchmarks of the simulator (``make bench`` runs ``python -m benchmarks.run_all``).

Every benchmark times its pair in one process, interleaving repetitions (A, B, A, B, ...) and reporting
medians, so that load from other processes on a shared machine hits both sides alike. Each module's
``run(quick)`` returns ``(metrics, tables)``: a flat ``{metric: value}`` dict for ``results.json`` and
markdown tables for BENCHMARKS.md.
"""
