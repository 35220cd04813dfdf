"""Training SAEs on model activations: ``Trainer(TrainConfig(...)).run()``, or ``sae-fast train``."""
from .checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .trainer import Trainer, make_adam

__all__ = ["TrainConfig", "Trainer", "make_adam", "save_checkpoint", "load_checkpoint", "list_checkpoints"]
