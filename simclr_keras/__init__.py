"""simclr_keras: SimCLR contrastive self-supervised learning for Keras 3 / TensorFlow.

Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020 (arXiv:2002.05709).

`import simclr_keras` is cheap: each name below is imported from its module on first use, so
TensorFlow loads only when a name that needs it is used (the command lines answer `--help` and flag
errors without it). Saved models still load: see simclr_keras/keras_registration.py.
"""

import importlib
import importlib.util

from simclr_keras import cpu_defaults, keras_registration

# Before TensorFlow loads: its oneDNN kernels on AVX2-only CPUs too (2x faster there; cpu_defaults.py).
cpu_defaults.enable_onednn()

__version__ = "0.1.0"

# Public name -> the module defining it (submodules of the package resolve on their own).
_EXPORTS = {
    "Encoder": "simclr_keras.encoder",
    "EvalConfig": "simclr_keras.eval_config",
    "EvalResult": "simclr_keras.eval_run",
    "FusedBatchNormalization": "simclr_keras.batch_norm",
    "LARS": "simclr_keras.optimizers",
    "MatmulGradientConv2D": "simclr_keras.conv",
    "ModelConfig": "simclr_keras.model_config",
    "MoCo": "simclr_keras.models.moco",
    "PretrainResult": "simclr_keras.train_run",
    "ProjectionHead": "simclr_keras.heads",
    "SimCLR": "simclr_keras.models.simclr",
    "SimCLRAugmentation": "simclr_keras.augment",
    "TrainConfig": "simclr_keras.train_config",
    "WarmupCosineDecay": "simclr_keras.optimizers",
    "build_moco": "simclr_keras.models.moco",
    "build_optimizer": "simclr_keras.optimizers",
    "build_simclr": "simclr_keras.models.simclr",
    "evaluate_encoder": "simclr_keras.eval_run",
    "export_encoder": "simclr_keras.export",
    "from_official_simclr": "simclr_keras.official",
    "load_encoder": "simclr_keras.export",
    "pretrain": "simclr_keras.train_run",
    "resnet": "simclr_keras.backbones",
    "scale_learning_rate": "simclr_keras.optimizers",
}

__all__ = sorted([*_EXPORTS, "data", "losses"])


def __getattr__(name):
    """Imports an exported name's module, or a submodule (`simclr_keras.plots`), on first use."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


keras_registration.register_now_or_after_keras()
