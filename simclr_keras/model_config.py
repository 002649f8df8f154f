"""The model's settings in one frozen dataclass, and the one place that turns them into layers.

`ModelConfig` holds what `build_simclr` and `build_moco` need (backbone, head, augmentation, loss and
the method's own settings), under the names of the training flags. `build_components(config)` maps it
to (encoder, projection head, augmenter); `build_model(config)` to a `SimCLR` or `MoCo` model.
`VALUE_RULES` is the one statement of each setting's valid range: `ModelConfig.validate`,
`TrainConfig.validate` and the model classes all check through it. Nothing here imports TensorFlow
at module level.
"""

import dataclasses
import warnings

METHODS = ("simclr", "moco_v2")
BACKBONE_DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50}
LOSSES = ("nt_xent", "hard_negative")
HEAD_BATCH_NORMS = ("all", "hidden", "none")
CROP_SAMPLERS = ("tensorflow", "torchvision")
# Gaussian blur: "reflect" mirrors the border; "zeros" is the official code's "SAME" convolution.
BLUR_PADDINGS = ("reflect", "zeros")
# "image": a blur sigma per image; "batch": one per view of a (per-replica) batch, as the official code.
BLUR_SIGMA_SCOPES = ("image", "batch")


def _integer(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# name -> (is the value valid, what would be right). Also used by the classes under their own argument
# names (MoCo's `momentum` is "moco_momentum" here), so each range is written once.
VALUE_RULES = {
    "temperature": (lambda v: _number(v) and v > 0, "> 0"),
    "objective_scale": (lambda v: v is None or (_number(v) and v > 0), "> 0 (or None: the method's)"),
    "width_multiplier": (lambda v: _number(v) and v > 0, "> 0"),
    "image_size": (lambda v: _integer(v) and v >= 8, ">= 8"),
    "proj_layers": (lambda v: _integer(v) and v >= 0, "an integer >= 0 (0: no projection head, the loss on h)"),
    "proj_dim": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "proj_hidden_dim": (lambda v: v is None or (_integer(v) and v >= 0), "an integer >= 0 (0: the width of h)"),
    "color_jitter_strength": (lambda v: _number(v) and v >= 0, ">= 0"),
    "color_jitter_probability": (lambda v: _number(v) and 0 <= v <= 1, "in [0, 1]"),
    "grayscale_probability": (lambda v: _number(v) and 0 <= v <= 1, "in [0, 1]"),
    "flip_probability": (lambda v: _number(v) and 0 <= v <= 1, "in [0, 1]"),
    "min_crop_area": (lambda v: _number(v) and 0 < v <= 1, "in (0, 1] (a fraction of the image's area)"),
    "num_classes": (lambda v: v is None or (_integer(v) and v >= 2), "None or an integer >= 2"),
    "hard_negative_beta": (lambda v: _number(v) and v >= 0, ">= 0"),
    "debias_tau_plus": (lambda v: _number(v) and 0 <= v < 1, "in [0, 1)"),
    "micro_batch_size": (lambda v: v is None or (_integer(v) and v >= 1), "an integer >= 1 (or None: one pass)"),
    "moco_momentum": (lambda v: _number(v) and 0 <= v < 1, "in [0, 1)"),
    "moco_queue_size": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "moco_bn_splits": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
}


def value_problem(rule, value, name=None):
    """"NAME must be ..., got VALUE." when `value` breaks VALUE_RULES[rule], else None; NAME defaults to rule."""
    is_valid, expectation = VALUE_RULES[rule]
    if is_valid(value):
        return None
    if rule == "image_size" and _integer(value):  # why the bound is 8
        return (
            f"{name or rule} must be >= 8, got {value!r}: the ResNet downsamples by 8 (CIFAR stem, up to 32 px) or "
            "by 32 (ImageNet stem, above 32 px), and a smaller image leaves its last block under one pixel."
        )
    return f"{name or rule} must be {expectation}, got {value!r}."


def check_value(rule, value, name=None):
    """Raises ValueError with `value_problem`'s message when `value` breaks the rule."""
    problem = value_problem(rule, value, name)
    if problem:
        raise ValueError(problem)


def method_problems(settings):
    """Problems of combining the settings (a ModelConfig or TrainConfig): the other method's options."""
    problems = []
    if settings.method == "moco_v2" and settings.loss != "nt_xent":
        problems.append(f"loss={settings.loss} applies to method=simclr; MoCo v2 uses its InfoNCE loss with a queue.")
    if settings.method == "moco_v2" and settings.proj_layers == 0:
        problems.append(
            "proj_layers=0 (no projection head, the loss on h) applies to method=simclr; MoCo v2 keeps its "
            "head: use proj_layers >= 1."
        )
    if settings.method == "moco_v2" and settings.micro_batch_size is not None:
        problems.append(
            f"micro_batch_size={settings.micro_batch_size} applies to method=simclr; MoCo v2 takes its negatives "
            "from a queue, not a large batch: leave it unset."
        )
    return problems


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The settings of a SimCLR or MoCo v2 model, named as the training flags (`simclr_keras.train --helpfull`).

    None for `temperature`, `proj_batch_norm` and `objective_scale` means the method's default: 0.5, "all"
    and 2 for SimCLR; 0.2, "none" (MoCo v2's Linear-ReLU-Linear head) and 2 (symmetric) or 1 for MoCo v2.
    `proj_hidden_dim` 0 or None: the width of h; `proj_layers` 0: no head (z = h, SimCLR only). `global_bn`: synchronized BatchNorm across replicas.
    """

    method: str = "simclr"
    image_size: int = 32
    backbone: str = "resnet18"
    width_multiplier: float = 1.0
    zero_init_residual: bool = True
    proj_layers: int = 2
    proj_dim: int = 128
    proj_batch_norm: str = None
    proj_hidden_dim: int = 0
    temperature: float = None
    objective_scale: float = None
    color_jitter_strength: float = 0.5
    color_jitter_probability: float = 0.8
    grayscale_probability: float = 0.2
    flip_probability: float = 0.5
    crop_sampler: str = "tensorflow"
    min_crop_area: float = 0.08
    use_blur: bool = False
    blur_padding: str = "reflect"
    blur_sigma_per: str = "image"
    global_bn: bool = False
    seed: int = None
    num_classes: int = None
    freeze_encoder: bool = False
    # SimCLR only
    loss: str = "nt_xent"
    hard_negative_beta: float = 1.0
    debias_tau_plus: float = 0.1
    micro_batch_size: int = None
    # MoCo v2 only
    moco_momentum: float = 0.99
    moco_queue_size: int = 4096
    moco_symmetric: bool = True
    moco_bn_splits: int = 8

    def validate(self):
        """Every problem of these settings, one line each naming the field and the value received."""
        problems = []
        for name, choices in (("method", METHODS), ("backbone", tuple(BACKBONE_DEPTHS)), ("loss", LOSSES),
                              ("crop_sampler", CROP_SAMPLERS), ("blur_padding", BLUR_PADDINGS),
                              ("blur_sigma_per", BLUR_SIGMA_SCOPES)):  # fmt: skip
            if getattr(self, name) not in choices:
                problems.append(f"{name} must be one of {list(choices)}, got {getattr(self, name)!r}.")
        if self.proj_batch_norm is not None and self.proj_batch_norm not in HEAD_BATCH_NORMS:
            problems.append(f"proj_batch_norm must be one of {list(HEAD_BATCH_NORMS)} or None, got {self.proj_batch_norm!r}.")
        if self.temperature is not None:
            problems.append(value_problem("temperature", self.temperature))
        for name in VALUE_RULES:
            if name != "temperature":
                problems.append(value_problem(name, getattr(self, name)))
        if self.freeze_encoder and not self.num_classes:
            problems.append("freeze_encoder=True trains only the linear probe, so it needs num_classes (labelled data).")
        return [problem for problem in problems if problem] + method_problems(self)

    @property
    def resolved_temperature(self):
        if self.temperature is not None:
            return self.temperature
        return 0.2 if self.method == "moco_v2" else 0.5

    @property
    def resolved_proj_batch_norm(self):
        if self.proj_batch_norm is not None:
            return self.proj_batch_norm
        return "none" if self.method == "moco_v2" else "all"

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def model_config_from_settings(config, settings, method, renamed=None):
    """The ModelConfig of `build_simclr(config, **settings)` / `build_moco(...)`: `config` updated by `settings`.

    `renamed` maps deprecated keyword names (the builders' spellings before ModelConfig) to fields;
    they still work, with a DeprecationWarning.
    """
    settings = dict(settings)
    for old, new in (renamed or {}).items():
        if old in settings:
            warnings.warn(f"{old}= is deprecated; pass {new}= (the flag's name).", DeprecationWarning, stacklevel=3)
            settings[new] = settings.pop(old)
    known = {field.name for field in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown model settings {unknown}; ModelConfig takes {sorted(known)}.")
    config = (config or ModelConfig(method=method)).replace(**settings)
    if config.method != method:
        raise ValueError(f"method={config.method!r} cannot be built by build_{method.split('_')[0]}; use build_model.")
    return config


def raise_for_problems(config):
    """Raises ValueError listing `config.validate()`'s problems, if any."""
    problems = config.validate()
    if problems:
        raise ValueError(" ".join(problems))


def build_components(config):
    """(encoder, projection head, augmenter) of a ModelConfig: the one mapping from settings to layers.

    The ResNet's stem follows `image_size` (CIFAR stem at 32 px and below); the layers are named
    "encoder", "projection_head" and "augmenter", as checkpoints and saved models expect.
    """
    from simclr_keras.augment import SimCLRAugmentation
    from simclr_keras.backbones import resnet
    from simclr_keras.heads import ProjectionHead

    raise_for_problems(config)
    encoder = resnet(
        depth=BACKBONE_DEPTHS[config.backbone],
        width_multiplier=config.width_multiplier,
        image_size=config.image_size,
        synchronized_batch_norm=config.global_bn,
        zero_init_residual=config.zero_init_residual,
        name="encoder",
    )
    head = ProjectionHead(
        num_layers=config.proj_layers,
        hidden_dim=config.proj_hidden_dim or None,
        output_dim=config.proj_dim,
        synchronized_batch_norm=config.global_bn,
        batch_norm=config.resolved_proj_batch_norm,
        name="projection_head",
    )
    augmenter = SimCLRAugmentation(
        config.image_size, color_jitter_strength=config.color_jitter_strength,
        color_jitter_probability=config.color_jitter_probability, grayscale_probability=config.grayscale_probability,
        flip_probability=config.flip_probability, use_blur=config.use_blur, seed=config.seed,
        crop_sampler=config.crop_sampler, crop_area_range=(config.min_crop_area, 1.0),
        blur_padding=config.blur_padding, blur_sigma_per=config.blur_sigma_per, name="augmenter",
    )  # fmt: skip
    return encoder, head, augmenter


def build_model(config):
    """The SimCLR or MoCo model (per `config.method`) of a ModelConfig, uncompiled."""
    if config.method == "moco_v2":
        from simclr_keras.models.moco import build_moco

        return build_moco(config)
    from simclr_keras.models.simclr import build_simclr

    return build_simclr(config)
