"""simclr_keras: SimCLR contrastive self-supervised learning for Keras 3 / TensorFlow.

Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020 (arXiv:2002.05709).
"""

from simclr_keras import data, losses
from simclr_keras.augment import SimCLRAugmentation
from simclr_keras.backbones import resnet
from simclr_keras.batch_norm import FusedBatchNormalization
from simclr_keras.conv import MatmulGradientConv2D
from simclr_keras.export import export_encoder, load_encoder
from simclr_keras.heads import ProjectionHead
from simclr_keras.models.moco import MoCo, build_moco
from simclr_keras.models.simclr import SimCLR, build_simclr
from simclr_keras.official import from_official_simclr
from simclr_keras.optimizers import LARS, WarmupCosineDecay, build_optimizer, scale_learning_rate

__version__ = "0.1.0"

__all__ = [
    "FusedBatchNormalization",
    "LARS",
    "MatmulGradientConv2D",
    "MoCo",
    "ProjectionHead",
    "SimCLR",
    "SimCLRAugmentation",
    "WarmupCosineDecay",
    "build_moco",
    "build_optimizer",
    "build_simclr",
    "data",
    "export_encoder",
    "from_official_simclr",
    "load_encoder",
    "losses",
    "resnet",
    "scale_learning_rate",
]
