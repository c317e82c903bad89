"""PowerSGD's rank over time and across layers: schedules (``rank_schedule``), the adaptive rule
(``adaptive``), per-layer ranks and spectral allocation (``layers``), and the wrapper that applies them
(``control``)."""
from .control import RankControl, RankedPowerSGD

__all__ = ["RankControl", "RankedPowerSGD"]
