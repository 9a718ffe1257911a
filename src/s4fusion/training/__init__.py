"""Training S4Fusion: typed configuration, learning-rate schedule and the trainer.

``s4fusion train --config FILE [key=value ...]`` is the command-line front end
(:mod:`s4fusion.cli.train`); :func:`train` is the Python API.
"""

from .config import (
    ConfigError,
    DataConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    load_config,
)
from .schedule import WarmupCosineSchedule
from .trainer import TrainingDivergedError, TrainResult, build_model, find_checkpoint, parameter_groups, train

__all__ = [
    "ConfigError",
    "DataConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "load_config",
    "WarmupCosineSchedule",
    "TrainingDivergedError",
    "TrainResult",
    "build_model",
    "find_checkpoint",
    "parameter_groups",
    "train",
]
