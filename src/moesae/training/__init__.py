"""Training: the loop (:mod:`.trainer`), the ``train`` stage (:mod:`.stage`) and the fingerprints
that decide which trained SAEs are still up to date (:mod:`.fingerprint`)."""
from .trainer import (
    CHECKPOINT_FILE, LOG_FILE, TrainConfig, TrainingDiverged, TrainingRun, finish, lr_multiplier, read_train_log,
    tensor_batches, train_saes, train_step,
)

__all__ = [
    "CHECKPOINT_FILE", "LOG_FILE", "TrainConfig", "TrainingDiverged", "TrainingRun", "finish", "lr_multiplier",
    "read_train_log", "tensor_batches", "train_saes", "train_step",
]
