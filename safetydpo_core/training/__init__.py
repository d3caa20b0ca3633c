"""Training safety experts: objectives (:mod:`.objectives`), settings (:mod:`.config`), the loop
(:mod:`.trainer`), checkpoints (:mod:`.checkpoint`) and metric logs (:mod:`.metrics`)."""

from .config import TrainConfig
from .trainer import TrainResult, train_expert

__all__ = ["TrainConfig", "TrainResult", "train_expert"]
