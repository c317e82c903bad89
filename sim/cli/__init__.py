"""Every command: ``python -m sim run|sweep|whatif|calibrate|list`` (``main``), ``python -m sim.launch``
(``launch``) and the demo (``demo``). The entry points ``sim/__main__.py`` and ``sim/launch.py`` only call
these. docs/cli.md describes each command."""
