"""``python -m sim <subcommand> ...``: the commands are in sim/cli/ (``sim.cli.main``)."""
import sys

from .allocator import keep_freed_memory
from .cli.main import main

if __name__ == "__main__":
    keep_freed_memory()  # this process is ours: big per-worker tensors reuse freed memory (see sim/allocator.py)
    sys.exit(main())
