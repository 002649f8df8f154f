"""Optimisers and learning-rate schedule used by SimCLR.

SimCLR (Chen et al., ICML 2020, arXiv:2002.05709, Section 2.2) trains with
LARS (You et al., "Large Batch Training of Convolutional Networks",
arXiv:1708.03888) at batch sizes up to 8192, a learning rate of
0.3 * BatchSize / 256 (or 0.075 * sqrt(BatchSize), Appendix B.1), weight decay
1e-6, a 10-epoch linear warm-up and cosine decay without restarts.  The
update rule follows the official google-research/simclr (tf2)
`lars_optimizer.py` with classic momentum.

Which variables are decayed / adapted
-------------------------------------
By default, variables of rank <= 1 are excluded from both weight decay and
the LARS trust ratio.  In the models of this package (and in Keras generally)
the trainable rank-1 variables are exactly batch-norm gammas/betas and
biases, the variables the official code excludes through the name patterns
"batch_normalization" and "bias".  A rank rule is used instead of names
because Keras 3 names variables by their own layer names ("gamma", "bias",
paths such as "group1_block1_bn1/gamma"), which depend on how layers were
named.  Lists of regular expressions can be given instead; they are searched
in `variable.path`, which includes the names of the enclosing models and
layers (e.g. "simclr/projection_head/batch_norm_0/gamma").

The official code's LARS also excludes "head_supervised", the linear
classifier it trains beside pretraining, from both; but its `add_weight_decay`
then adds weight_decay * ||kernel||^2 / 2 of that head to the loss.  So its
kernel is decayed (the bias is not) and updated by plain momentum at the
scheduled learning rate, without trust ratio.  Here that head is the online
probe: `ContrastiveModel.compile` keeps its variables out of layer adaptation
(`LARS.exclude_from_layer_adaptation`), and the rank rule decays its kernel.
"""

import math
import re

import keras
from keras import ops

# Name patterns of batch-norm parameters and biases for Keras' own
# `Optimizer.exclude_from_weight_decay(var_names=...)`, which matches
# `variable.name` ("gamma", "beta", "bias"; "bias:0" for raw tf.Variables).
BATCH_NORM_AND_BIAS_NAMES = ("gamma", "beta", "bias")

_LEARNING_RATE_SCALINGS = ("linear", "sqrt")
_OPTIMIZER_NAMES = ("lars", "sgd", "adam", "adamw")
SCHEDULE_NAMES = ("cosine", "constant")


def _is_rank_at_most_one(variable):
    return len(variable.shape) <= 1


def _compile_patterns(patterns, argument_name):
    if patterns is None:
        return None
    if isinstance(patterns, str):
        raise ValueError(
            f"{argument_name} must be None or a list of regular expressions, "
            f"received the string {argument_name}={patterns!r}; wrap it in a list."
        )
    patterns = list(patterns)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(
                f"{argument_name} must contain strings, received {pattern!r} "
                f"in {argument_name}={patterns!r}."
            )
    return patterns


def _matches_any(variable, patterns):
    path = getattr(variable, "path", None) or variable.name
    return any(re.search(pattern, path) is not None for pattern in patterns)


@keras.saving.register_keras_serializable(package="simclr_keras")
class LARS(keras.optimizers.Optimizer):
    """Layer-wise Adaptive Rate Scaling with classic momentum.

    For each variable w with gradient g (You et al., arXiv:1708.03888, Alg. 1;
    official SimCLR `lars_optimizer.py`):

        g = g + weight_decay * w                  if w is decayed
        trust_ratio = eta * ||w|| / ||g||         if w is adapted and both
                                                  norms are > 0, else 1
        v = momentum * v + learning_rate * trust_ratio * g
        w = w - v                                 (nesterov: w - momentum * v
                                                   - learning_rate * trust_ratio * g)

    The weight decay is coupled (added to the gradient before the trust
    ratio), so Keras' decoupled `weight_decay` mechanism of the base class is
    switched off; `optimizer.exclude_from_weight_decay(var_list, var_names)`
    is still honoured on top of `exclude_from_weight_decay` below.

    Args:
        learning_rate: float or `keras.optimizers.schedules.LearningRateSchedule`.
        momentum: momentum coefficient in [0, 1).
        weight_decay: L2 coefficient (>= 0) added to the gradient.
        eta: trust coefficient of the layer-wise learning rate.
        nesterov: use Nesterov momentum.
        exclude_from_weight_decay: None (variables of rank <= 1, i.e.
            batch-norm parameters and biases, are not decayed) or a list of
            regular expressions searched in `variable.path`.
        exclude_from_layer_adaptation: None (same rule as weight decay, as the
            official code) or a list of regular expressions; matching
            variables use trust ratio 1. Variables can be added with the
            method of that name.
        **kwargs: base optimiser arguments (name, clipnorm, global_clipnorm,
            use_ema, loss_scale_factor, gradient_accumulation_steps, ...).
    """

    def __init__(
        self,
        learning_rate=0.001,
        momentum=0.9,
        weight_decay=0.0,
        eta=0.001,
        nesterov=False,
        exclude_from_weight_decay=None,
        exclude_from_layer_adaptation=None,
        name=None,
        **kwargs,
    ):
        if isinstance(learning_rate, int) and not isinstance(learning_rate, bool):
            learning_rate = float(learning_rate)
        # weight_decay stays out of the base class, which would apply it
        # decoupled (w -= lr * wd * w) outside `update_step`.
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"momentum must be in [0, 1), received momentum={momentum!r}.")
        if weight_decay is None:
            weight_decay = 0.0
        if float(weight_decay) < 0.0:
            raise ValueError(
                f"weight_decay must be >= 0, received weight_decay={weight_decay!r}."
            )
        if float(eta) <= 0.0:
            raise ValueError(f"eta must be > 0, received eta={eta!r}.")
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.eta = float(eta)
        self.nesterov = bool(nesterov)
        self.weight_decay_exclusions = _compile_patterns(
            exclude_from_weight_decay, "exclude_from_weight_decay"
        )
        self.layer_adaptation_exclusions = _compile_patterns(
            exclude_from_layer_adaptation, "exclude_from_layer_adaptation"
        )
        self._unadapted_variable_keys = set()

    def exclude_from_layer_adaptation(self, var_list):
        """Gives the variables of `var_list` trust ratio 1 (plain momentum), whatever the patterns say.

        Like Keras' `exclude_from_weight_decay(var_list=...)`, this must come before `build`.
        """
        if self.built:
            raise ValueError(
                "LARS.exclude_from_layer_adaptation() must be called before the optimizer is built (by its first "
                "step, or by compile on a model whose optimizer was built before); use a new LARS."
            )
        self._unadapted_variable_keys.update(self._var_key(variable) for variable in var_list)

    def _excluded_by_default_or_patterns(self, variable, patterns):
        if patterns is None:
            return _is_rank_at_most_one(variable)
        return _matches_any(variable, patterns)

    def applies_weight_decay(self, variable):
        """Whether `variable` (a model `keras.Variable`) gets L2 weight decay."""
        if not self.weight_decay:
            return False
        if self._excluded_by_default_or_patterns(variable, self.weight_decay_exclusions):
            return False
        # Exclusions registered through Keras' `exclude_from_weight_decay()`.
        return super()._use_weight_decay(variable)

    def applies_layer_adaptation(self, variable):
        """Whether `variable` (a model `keras.Variable`) uses the trust ratio."""
        if self._var_key(variable) in self._unadapted_variable_keys:
            return False
        patterns = self.layer_adaptation_exclusions
        if patterns is None:
            patterns = self.weight_decay_exclusions
        return not self._excluded_by_default_or_patterns(variable, patterns)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = self.add_optimizer_variables(variables, "momentum")
        # Decided once here, on the Keras variables: `update_step` receives
        # backend variables that no longer carry the Keras path.
        self._decay_flags = [self.applies_weight_decay(v) for v in variables]
        self._adaptation_flags = [self.applies_layer_adaptation(v) for v in variables]

    def _apply_weight_decay(self, variables):
        # Coupled weight decay happens inside `update_step`.
        return

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        dtype = variable.dtype
        learning_rate = ops.cast(learning_rate, dtype)
        gradient = ops.cast(gradient, dtype)
        velocity = self.momentums[index]

        if self._decay_flags[index]:
            gradient = gradient + ops.cast(self.weight_decay, dtype) * variable

        if self._adaptation_flags[index]:
            weight_norm = ops.sqrt(ops.sum(ops.square(variable)))
            gradient_norm = ops.sqrt(ops.sum(ops.square(gradient)))
            both_positive = ops.logical_and(weight_norm > 0, gradient_norm > 0)
            # The denominator is replaced where unused so no inf/nan is formed.
            safe_gradient_norm = ops.where(both_positive, gradient_norm, ops.ones_like(gradient_norm))
            trust_ratio = ops.where(
                both_positive,
                ops.cast(self.eta, dtype) * weight_norm / safe_gradient_norm,
                ops.ones_like(weight_norm),
            )
            scaled_learning_rate = learning_rate * trust_ratio
        else:
            scaled_learning_rate = learning_rate

        momentum = ops.cast(self.momentum, dtype)
        scaled_gradient = scaled_learning_rate * gradient
        next_velocity = momentum * velocity + scaled_gradient
        self.assign(velocity, next_velocity)
        if self.nesterov:
            self.assign_sub(variable, momentum * next_velocity + scaled_gradient)
        else:
            self.assign_sub(variable, next_velocity)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "momentum": self.momentum,
                "weight_decay": self.weight_decay,
                "eta": self.eta,
                "nesterov": self.nesterov,
                "exclude_from_weight_decay": self.weight_decay_exclusions,
                "exclude_from_layer_adaptation": self.layer_adaptation_exclusions,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="simclr_keras")
class SGDWithL2(keras.optimizers.SGD):
    """Keras SGD (with momentum) whose weight decay is coupled L2.

    Keras' `weight_decay` is decoupled (w -= lr * wd * w before the update);
    the official SimCLR code instead adds wd * ||w||^2 / 2 to the loss for its
    momentum optimiser, i.e. g = g + wd * w, which then also flows through
    the momentum buffer.  This subclass does the latter.  Exclusions use
    Keras' `exclude_from_weight_decay(var_list, var_names)`.
    """

    def _apply_weight_decay(self, variables):
        # Coupled weight decay happens inside `update_step`.
        return

    def update_step(self, gradient, variable, learning_rate):
        if self.weight_decay and self._use_weight_decay(variable):
            gradient = ops.cast(gradient, variable.dtype) + ops.cast(
                self.weight_decay, variable.dtype
            ) * variable
        super().update_step(gradient, variable, learning_rate)


@keras.saving.register_keras_serializable(package="simclr_keras")
class AdamWithL2(keras.optimizers.Adam):
    """Keras Adam whose weight decay is coupled L2, as PyTorch's `torch.optim.Adam(weight_decay=...)`.

    g = g + weight_decay * w enters both moment estimates (the debiased and HCL reference code train
    with it). Keras' own `weight_decay` is decoupled; that is `AdamW`. Exclusions use Keras'
    `exclude_from_weight_decay(var_list, var_names)`.
    """

    def _apply_weight_decay(self, variables):
        # Coupled weight decay happens inside `update_step`.
        return

    def update_step(self, gradient, variable, learning_rate):
        if self.weight_decay and self._use_weight_decay(variable):
            gradient = ops.cast(gradient, variable.dtype) + ops.cast(self.weight_decay, variable.dtype) * variable
        super().update_step(gradient, variable, learning_rate)


@keras.saving.register_keras_serializable(package="simclr_keras")
class WarmupCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up followed by cosine decay to zero (SimCLR, Section B.1).

        lr(step) = base_learning_rate * step / warmup_steps     step < warmup_steps
        lr(step) = base_learning_rate * 0.5 * (1 + cos(pi * (step - warmup_steps)
                   / (total_steps - warmup_steps)))               afterwards

    and 0 after `total_steps`, as the official `WarmUpAndCosineDecay`.
    `base_learning_rate` is the already batch-scaled rate (see
    `scale_learning_rate`).
    """

    def __init__(self, base_learning_rate, total_steps, warmup_steps=0, name=None):
        super().__init__()
        if not 0 <= float(base_learning_rate) < math.inf:  # also rejects NaN
            raise ValueError(
                "base_learning_rate must be finite and >= 0, received "
                f"base_learning_rate={base_learning_rate!r}."
            )
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(
                f"total_steps must be a positive integer, received total_steps={total_steps!r}."
            )
        if (
            isinstance(warmup_steps, bool)
            or not isinstance(warmup_steps, int)
            or not 0 <= warmup_steps <= total_steps
        ):
            raise ValueError(
                "warmup_steps must be an integer in [0, total_steps="
                f"{total_steps}], received warmup_steps={warmup_steps!r}."
            )
        self.base_learning_rate = float(base_learning_rate)
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.name = name

    def __call__(self, step):
        step = ops.cast(step, "float32")
        base = ops.cast(self.base_learning_rate, "float32")
        warmup_steps = float(self.warmup_steps)
        decay_steps = float(max(self.total_steps - self.warmup_steps, 1))
        warmup_rate = base * step / max(warmup_steps, 1.0)
        progress = ops.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
        cosine_rate = base * 0.5 * (1.0 + ops.cos(math.pi * progress))
        return ops.where(step < warmup_steps, warmup_rate, cosine_rate)

    def get_config(self):
        return {
            "base_learning_rate": self.base_learning_rate,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "name": self.name,
        }


@keras.saving.register_keras_serializable(package="simclr_keras")
class WarmupConstant(WarmupCosineDecay):
    """Linear warm-up, then `base_learning_rate` for ever (the debiased and HCL reference code: Adam at
    a constant 1e-3, no warm-up). `total_steps` only bounds `warmup_steps`."""

    def __call__(self, step):
        step = ops.cast(step, "float32")
        base = ops.cast(self.base_learning_rate, "float32")
        warmup_steps = float(self.warmup_steps)
        return ops.where(step < warmup_steps, base * step / max(warmup_steps, 1.0), base)


def build_schedule(name, base_learning_rate, total_steps, warmup_steps=0):
    """The learning-rate schedule called `name`: "cosine" (`WarmupCosineDecay`) or "constant" (`WarmupConstant`)."""
    schedules = {"cosine": WarmupCosineDecay, "constant": WarmupConstant}
    if name not in schedules:
        raise ValueError(f"Unknown learning-rate schedule: name={name!r}. Expected one of {list(SCHEDULE_NAMES)}.")
    return schedules[name](base_learning_rate, total_steps, warmup_steps)


def scale_learning_rate(learning_rate, batch_size, scaling):
    """Batch-size scaling of the base learning rate (SimCLR, Appendix B.1).

    "linear": learning_rate * batch_size / 256 (0.3 in the paper);
    "sqrt": learning_rate * sqrt(batch_size) (0.075 in the paper, better for
    small batches and long training).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"batch_size must be a positive integer, received batch_size={batch_size!r}."
        )
    if scaling == "linear":
        return learning_rate * batch_size / 256.0
    if scaling == "sqrt":
        return learning_rate * math.sqrt(batch_size)
    raise ValueError(
        f"Unknown learning-rate scaling: scaling={scaling!r}. Expected one of "
        f"{list(_LEARNING_RATE_SCALINGS)}."
    )


# Keras 3 variable paths end in the variable's name: ".../batch_normalization/gamma", ".../dense/bias".
BATCH_NORM_AND_BIAS_PATH_PATTERN = r"(^|/)(gamma|beta|bias)$"


def build_optimizer(name, learning_rate, weight_decay=0.0, momentum=0.9, exclude_layers=(), nesterov=True):
    """Create the optimiser called `name` with SimCLR's exclusions.

    * "lars": `LARS` with coupled weight decay; batch-norm parameters and
      biases are neither decayed nor adapted (official pre-training setup).
      The online probe stays out of layer adaptation whatever the arguments
      (`ContrastiveModel.compile`).
    * "sgd": `SGDWithL2`, Keras SGD with Nesterov momentum (the official
      "momentum" optimiser; `nesterov=False`: plain momentum, as
      torch.optim.SGD in MoCo) and coupled L2 weight decay.
    * "adam": `AdamWithL2`, Adam with coupled L2 weight decay and PyTorch's
      epsilon 1e-8 (`torch.optim.Adam`, the debiased and HCL reference code).
    * "adamw": Keras AdamW, decoupled weight decay (Loshchilov & Hutter).

    For "sgd", "adam" and "adamw" batch-norm gammas/betas and biases are excluded
    from weight decay by name (`BATCH_NORM_AND_BIAS_NAMES`).

    Args:
        name: "lars", "sgd", "adam" or "adamw".
        learning_rate: float or LearningRateSchedule.
        weight_decay: weight-decay coefficient (>= 0).
        momentum: momentum for "lars" and "sgd" (ignored by "adam" and "adamw").
        exclude_layers: names of layers whose variables LARS keeps out of
            layer adaptation (plain momentum at the scheduled rate), their
            kernels still decayed: how the official code trains its
            supervised head, excluded from its LARS but decayed by
            `add_weight_decay`. The online probe needs no entry here.
    """
    if float(weight_decay) < 0:
        raise ValueError(
            f"weight_decay must be >= 0, received weight_decay={weight_decay!r}."
        )
    if name == "lars":
        decay_exclusions = adaptation_exclusions = None  # the rank <= 1 rule
        if exclude_layers:
            decay_exclusions = [BATCH_NORM_AND_BIAS_PATH_PATTERN]
            adaptation_exclusions = decay_exclusions + [f"(^|/){re.escape(layer)}/" for layer in exclude_layers]
        return LARS(
            learning_rate,
            momentum=momentum,
            weight_decay=weight_decay,
            exclude_from_weight_decay=decay_exclusions,
            exclude_from_layer_adaptation=adaptation_exclusions,
        )
    if name == "sgd":
        optimizer = SGDWithL2(
            learning_rate,
            momentum=float(momentum),
            nesterov=bool(nesterov),
            weight_decay=float(weight_decay) or None,
        )
    elif name == "adam":
        optimizer = AdamWithL2(learning_rate, epsilon=1e-8, weight_decay=float(weight_decay) or None)
    elif name == "adamw":
        optimizer = keras.optimizers.AdamW(learning_rate, weight_decay=float(weight_decay))
    else:
        raise ValueError(
            f"Unknown optimizer: name={name!r}. Expected one of {list(_OPTIMIZER_NAMES)}."
        )
    optimizer.exclude_from_weight_decay(var_names=list(BATCH_NORM_AND_BIAS_NAMES))
    return optimizer
