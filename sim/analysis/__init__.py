"""Analysis of results tables: paired comparisons over seeds (``compare``) and the learning-rate protocol."""
from .compare import compare, paired_summary, t_interval
from .protocol import tune_lr

__all__ = ["compare", "paired_summary", "t_interval", "tune_lr"]
