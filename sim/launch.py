"""``python -m sim.launch ...``: an experiment on real processes (the command is ``sim.cli.launch``)."""
import os
import sys

from .cli.launch import main
from .real.distributed import exit_without_finalizers

if __name__ == "__main__":
    code = main()
    if code == 0 and "RANK" in os.environ:  # a torchrun rank, its result saved and its group destroyed
        exit_without_finalizers()  # no interpreter finalization for gloo's threads to abort in
    sys.exit(code)
