"""Self-supervised models: keras.Model subclasses with a custom train_step."""

from simclr_keras.models.contrastive import ContrastiveModel
from simclr_keras.models.moco import MoCo, build_moco
from simclr_keras.models.simclr import SimCLR, build_simclr

__all__ = ["ContrastiveModel", "MoCo", "SimCLR", "build_moco", "build_simclr"]
