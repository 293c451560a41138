"""zo2tier: zeroth-order (MeZO-SGD) full-parameter fine-tuning over GPU / host RAM / disk tiers.

Public API::

    import zo2tier
    engine = zo2tier.ZOEngine(model, budget={"device": "8GiB", "host": "16GiB", "disk": "100GiB"},
                              disk_dir="runs/disk", device="cuda:0",
                              config=zo2tier.MeZOConfig(lr=1e-6, eps=1e-3))
"""

from zo2tier.budget import TierBudget, parse_size
from zo2tier.config import MeZOConfig
from zo2tier.distributed import DataParallel, ReplicaDivergenceError, check_replicas
from zo2tier.engine import StepResult, ZOEngine
from zo2tier.model.blocks import UnsupportedModelError
from zo2tier.store.blockstore import StoreCorruptError
from zo2tier.store.convert import convert
from zo2tier.store.export import export_store
from zo2tier.tiers.store_dir import StoreLockedError

__all__ = [
    "DataParallel",
    "MeZOConfig",
    "ReplicaDivergenceError",
    "StepResult",
    "StoreCorruptError",
    "StoreLockedError",
    "TierBudget",
    "UnsupportedModelError",
    "ZOEngine",
    "check_replicas",
    "convert",
    "export_store",
    "parse_size",
]
__version__ = "0.1.0"
