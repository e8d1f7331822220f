"""The trainer: datasets, recipes, the loop, checkpoints, metrics, plots, data parallelism."""
from mlaan_fast.train.config import TrainConfig, resolve_config
from mlaan_fast.train.loop import RunResult, TrainingDiverged, evaluate, train

__all__ = ["RunResult", "TrainConfig", "TrainingDiverged", "evaluate", "resolve_config", "train"]
