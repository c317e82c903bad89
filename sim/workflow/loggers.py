"""TensorBoard logging of a run, as an ``on_step`` callback (needs the optional ``tensorboard`` package:
``pip install -e ".[tensorboard]"``).

    logger = TensorBoardLogger("runs/tensorboard/powersgd-rank2")
    sim.run(experiment, on_step=logger)        # then: tensorboard --logdir runs/tensorboard
    logger.close()

Every step's metrics (``simulation.last_metrics``: train_loss, lr, bits, compression_error, memory_norm,
sim_time, update_norm, and test_loss/test_accuracy and val_loss/val_accuracy on evaluated steps) become scalars
tagged ``train/...``, ``test/...``, ``validation/...`` and ``comm/...``, at the step number; NaN values (metrics not measured at that step) are left out. The experiment's
configuration is written once as text, so a TensorBoard run says what produced it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from compressors.options import check_int

#: metric -> TensorBoard tag (grouped as TensorBoard shows them: one section per prefix)
TAGS = {
    "train_loss": "train/loss", "lr": "train/lr", "skipped_steps": "train/skipped_steps",
    "test_loss": "test/loss", "test_accuracy": "test/accuracy",
    "val_loss": "validation/loss", "val_accuracy": "validation/accuracy", "update_norm": "train/update_norm",
    "bits": "comm/bits_per_worker", "compression_error": "comm/compression_error",
    "memory_norm": "comm/memory_norm", "sim_time": "comm/sim_time_seconds",
}


class TensorBoardLogger:
    """An ``on_step(simulation, state)`` callback writing TensorBoard event files under ``log_dir``.

    ``every``: log every this many steps (evaluated steps are always logged). Usable as a context manager.
    """

    def __init__(self, log_dir: str | Path, every: int = 1):
        check_int("TensorBoardLogger", "every", every, minimum=1)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # torch's writer needs the tensorboard package
            raise ImportError("TensorBoardLogger needs the tensorboard package: pip install -e \".[tensorboard]\" "
                              "(or pip install tensorboard)") from error
        self.log_dir = Path(log_dir)
        self.every = every
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self._described = False

    def __call__(self, simulation, state) -> None:
        if not self._described:  # once: what produced this run
            config = json.dumps(simulation.experiment.to_dict(), indent=2, sort_keys=True, default=str)
            self.writer.add_text("experiment", f"```\n{config}\n```", global_step=0)
            self._described = True
        metrics = getattr(simulation, "last_metrics", {}) or {}
        evaluated = "test_loss" in metrics
        if state.step % self.every and not evaluated:
            return
        for name, value in metrics.items():
            if name == "step" or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            self.writer.add_scalar(TAGS.get(name, f"other/{name}"), float(value), global_step=state.step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> "TensorBoardLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
