"""Projection head g(.) of SimCLR.

SimCLR (Chen et al., ICML 2020, arXiv:2002.05709, Section 2.1) maps the
representation h to z = g(h), on which the contrastive loss is applied; a
non-linear head improves the representation h by more than 10% (Section 4.2).
SimCLR v1 uses two layers, SimCLR v2 (Chen et al., NeurIPS 2020,
arXiv:2006.10029) three.  The layers follow the official google-research/simclr
(tf2) `model.py`: every layer is a bias-free Dense followed by batch norm;
hidden layers have a batch-norm beta and a ReLU, the output layer has neither
(batch norm with `center=False`). Other methods' heads have less batch norm
(`batch_norm="hidden"`: the debiased and HCL reference code; `"none"`: MoCo v2),
and a bias on every Dense that no batch norm follows.
"""

import keras
from keras import ops

from simclr_keras.backbones import BATCH_NORM_EPSILON, BATCH_NORM_MOMENTUM
from simclr_keras.batch_norm import FusedBatchNormalization

# Which Dense layers of the head a batch norm follows (see `ProjectionHead`).
HEAD_BATCH_NORMS = ("all", "hidden", "none")


@keras.saving.register_keras_serializable(package="simclr_keras")
class ProjectionHead(keras.layers.Layer):
    """Non-linear projection head z = g(h).

    Args:
        num_layers: number of Dense + BatchNorm layers; 2 is SimCLR v1,
            3 is SimCLR v2, 0 is no head (z = h, the identity: the paper's
            "none" arm of Fig. 8, the official code's `proj_head_mode='none'`).
        hidden_dim: width of the hidden layers; None uses the width of the
            input h, as the official code.
        output_dim: width of z (128 in the paper).
        synchronized_batch_norm: use cross-replica batch norm.
        batch_norm: which Dense layers a batch norm follows. "all" (SimCLR,
            official `model.py`): bias-free Dense + batch norm everywhere,
            initial kernels N(0, 0.01^2). "hidden" (debiased and HCL reference
            code): batch norm after the hidden layers only, the output Dense
            has a bias. "none" (MoCo v2's `--mlp` head): Dense with bias,
            ReLU between them, no batch norm. Without "all", kernels and
            biases start as PyTorch's default Linear (uniform in
            +-1/sqrt(fan_in)), the framework of those references.
        **kwargs: forwarded to `keras.layers.Layer` (name, dtype, ...).

    Call arguments:
        inputs: h, float tensor [B, D].
        training: selects batch statistics (True) or moving averages.
        head_layer: None (z), or K in [0, num_layers]: the output of the K-th
            layer (after its ReLU for a hidden layer), 0 being h itself; the
            features SimCLR v2 fine-tunes and probes from (`ft_proj_selector`).

    Returns z (or the K-th layer's output), float32 [B, width] whatever the dtype policy.
    """

    def __init__(
        self,
        num_layers=2,
        hidden_dim=None,
        output_dim=128,
        synchronized_batch_norm=False,
        batch_norm="all",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if batch_norm not in HEAD_BATCH_NORMS:
            raise ValueError(
                f"batch_norm must be one of {list(HEAD_BATCH_NORMS)}, received batch_norm={batch_norm!r}."
            )
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
            raise ValueError(
                "num_layers must be an integer >= 0 (0: no head, z = h), received "
                f"num_layers={num_layers!r}."
            )
        if hidden_dim is not None and (
            isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int) or hidden_dim < 1
        ):
            raise ValueError(
                "hidden_dim must be None (use the input width) or a positive "
                f"integer, received hidden_dim={hidden_dim!r}."
            )
        if isinstance(output_dim, bool) or not isinstance(output_dim, int) or output_dim < 1:
            raise ValueError(
                "output_dim must be a positive integer, received "
                f"output_dim={output_dim!r}."
            )
        self.num_layers = num_layers
        self.hidden_dim = hidden_dim
        self.output_dim = output_dim
        self.synchronized_batch_norm = bool(synchronized_batch_norm)
        self.batch_norm = batch_norm
        self.dense_layers = []
        # Aligned with dense_layers; None where no batch norm follows the Dense.
        self.batch_norm_layers = []

    def build(self, input_shape):
        input_dim = input_shape[-1]
        if input_dim is None:
            raise ValueError(
                "ProjectionHead needs a known input width (last axis); "
                f"received input_shape={tuple(input_shape)}."
            )
        hidden_dim = self.hidden_dim if self.hidden_dim is not None else int(input_dim)
        dense_layers = []
        batch_norm_layers = []
        current_dim = int(input_dim)
        for layer_index in range(self.num_layers):
            is_output_layer = layer_index == self.num_layers - 1
            units = self.output_dim if is_output_layer else hidden_dim
            has_batch_norm = self.batch_norm == "all" or (self.batch_norm == "hidden" and not is_output_layer)
            dense = keras.layers.Dense(
                units,
                use_bias=not has_batch_norm,
                dtype=self.dtype_policy,
                name=f"dense_{layer_index}",
                **self._initializers(current_dim),
            )
            dense.build((None, current_dim))
            batch_norm = None
            if has_batch_norm:
                batch_norm = FusedBatchNormalization(
                    momentum=BATCH_NORM_MOMENTUM,
                    epsilon=BATCH_NORM_EPSILON,
                    # No beta on SimCLR's output layer: the official head builds it
                    # with use_bias=False, which also turns off the batch-norm centre.
                    center=not (is_output_layer and self.batch_norm == "all"),
                    synchronized=self.synchronized_batch_norm,
                    dtype=self.dtype_policy,
                    name=f"batch_norm_{layer_index}",
                )
                batch_norm.build((None, units))
            dense_layers.append(dense)
            batch_norm_layers.append(batch_norm)
            current_dim = units
        self.dense_layers = dense_layers
        self.batch_norm_layers = batch_norm_layers
        # tf.train.Checkpoint does not see into these lists: name every sublayer as an attribute too,
        # or checkpoints would silently lose the head's BatchNorm statistics.
        for layer_index, (dense, batch_norm) in enumerate(zip(dense_layers, batch_norm_layers)):
            setattr(self, f"dense_{layer_index}", dense)
            if batch_norm is not None:
                setattr(self, f"batch_norm_{layer_index}", batch_norm)

    def _initializers(self, fan_in):
        """Dense initializers: the official SimCLR head's, or PyTorch's default Linear."""
        if self.batch_norm == "all":
            return {"kernel_initializer": keras.initializers.RandomNormal(stddev=0.01)}
        bound = 1.0 / fan_in**0.5
        return {
            # Variance scaling 1/3, uniform: bounds +-sqrt(3 * (1/3) / fan_in) = +-1/sqrt(fan_in).
            "kernel_initializer": keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform"),
            "bias_initializer": keras.initializers.RandomUniform(-bound, bound),
        }

    def call(self, inputs, training=None, head_layer=None):
        head_layer = self._check_head_layer(head_layer)
        outputs = inputs
        for layer_index, (dense, batch_norm) in enumerate(
            list(zip(self.dense_layers, self.batch_norm_layers))[:head_layer]
        ):
            outputs = dense(outputs)
            if batch_norm is not None:
                outputs = batch_norm(outputs, training=training)
            if layer_index < self.num_layers - 1:
                outputs = ops.relu(outputs)
        # The contrastive loss divides by a small temperature; keep it float32.
        return ops.cast(outputs, "float32")

    def _check_head_layer(self, head_layer):
        if head_layer is None:
            return self.num_layers
        if self.num_layers == 0 and head_layer != 0:
            raise ValueError(
                f"head_layer must be 0 (h): this model was trained without a projection head (proj_layers=0), "
                f"received head_layer={head_layer!r}."
            )
        if isinstance(head_layer, bool) or not isinstance(head_layer, int) or not 0 <= head_layer <= self.num_layers:
            raise ValueError(
                f"head_layer must be an integer in [0, {self.num_layers}] (0: h, "
                f"{self.num_layers}: z), received head_layer={head_layer!r}."
            )
        return head_layer

    def compute_output_shape(self, input_shape, head_layer=None):
        head_layer = self._check_head_layer(head_layer)
        if head_layer == 0:
            width = input_shape[-1]
        elif head_layer == self.num_layers:
            width = self.output_dim
        else:
            width = self.hidden_dim if self.hidden_dim is not None else input_shape[-1]
        return tuple(input_shape[:-1]) + (width,)

    def compute_output_spec(self, inputs, training=None, head_layer=None):
        return keras.KerasTensor(
            self.compute_output_shape(inputs.shape, head_layer), dtype="float32"
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_layers": self.num_layers,
                "hidden_dim": self.hidden_dim,
                "output_dim": self.output_dim,
                "synchronized_batch_norm": self.synchronized_batch_norm,
                "batch_norm": self.batch_norm,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="simclr_keras")
class LinearProbe(keras.layers.Layer):
    """Linear classifier on (frozen) representations: parameter-free BatchNorm, then Dense.

    The Dense layer is the official SimCLR code's supervised head (`LinearLayer`: kernel drawn from
    N(0, 0.01^2), zero bias). The BatchNorm in front has no scale or offset, so at inference (moving
    statistics) the probe is still an affine map of h; it only standardises each feature (He et al.,
    "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022, put the same normalisation before
    their linear probe). The official head reads h as it is; the normalisation stays because trained
    h has a large common mean (0.65 per feature after the quickstart, E[h h^T] with a top eigenvalue
    of 76 in 128 dimensions, against 40 standardised), which makes the probe's loss far sharper: at
    the quickstart's learning rates the probe on raw h peaked at a cross-entropy of 44, on
    standardised h at 6, and ended 2-3 points less accurate (BENCHMARKS.md, "The online probe").
    Always float32.

    Args:
        num_classes: number of classes (>= 2).
        synchronized_batch_norm: standardise with statistics of the global batch across replicas.

    Returns logits, float32 [B, num_classes].
    """

    def __init__(self, num_classes, synchronized_batch_norm=False, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, received num_classes={num_classes!r}.")
        self.num_classes = num_classes
        self.synchronized_batch_norm = bool(synchronized_batch_norm)
        self.normalization = keras.layers.BatchNormalization(
            synchronized=self.synchronized_batch_norm,
            center=False,
            scale=False,
            momentum=BATCH_NORM_MOMENTUM,
            epsilon=BATCH_NORM_EPSILON,
            dtype="float32",
            name="feature_normalization",
        )
        self.classifier = keras.layers.Dense(
            num_classes,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
            dtype="float32",
            name="classifier",
        )

    def build(self, input_shape):
        self.normalization.build(input_shape)
        self.classifier.build(input_shape)

    def call(self, inputs, training=False):
        features = ops.cast(inputs, "float32")
        return self.classifier(self.normalization(features, training=training))

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.num_classes)

    def get_config(self):
        config = super().get_config()
        config.update({"num_classes": self.num_classes, "synchronized_batch_norm": self.synchronized_batch_norm})
        return config
