"""Training: the :class:`Trainer` loop, its :class:`TrainConfig`, and pickle-free checkpoints.

from lowbit.train import Trainer, TrainConfig
config = TrainConfig.from_dict({"epochs": 20, "optimizer": "adam", "lr": 1e-3})
summary = Trainer(model, train_set, val_set, config, Path("runs/ttq")).fit()
"""

from .checkpoint import (
    CheckpointError,
    capture_training_state,
    load_checkpoint,
    restore_training_state,
    save_checkpoint,
)
from .config import CommConfig, TrainConfig
from .distributed import is_main_process
from .trainer import Trainer, TrainingDiverged, evaluate

__all__ = [
    "CheckpointError",
    "CommConfig",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "capture_training_state",
    "evaluate",
    "is_main_process",
    "load_checkpoint",
    "restore_training_state",
    "save_checkpoint",
]
