"""Self-supervised models: keras.Model subclasses with a custom train_step."""

from simclr_keras.models.simclr import SimCLR

__all__ = ["SimCLR"]
