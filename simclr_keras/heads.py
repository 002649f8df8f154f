"""Projection head g(.) of SimCLR.

SimCLR (Chen et al., ICML 2020, arXiv:2002.05709, Section 2.1) maps the
representation h to z = g(h), on which the contrastive loss is applied; a
non-linear head improves the representation h by more than 10% (Section 4.2).
SimCLR v1 uses two layers, SimCLR v2 (Chen et al., NeurIPS 2020,
arXiv:2006.10029) three.  The layers follow the official google-research/simclr
(tf2) `model.py`: every layer is a bias-free Dense followed by batch norm;
hidden layers have a batch-norm beta and a ReLU, the output layer has neither
(batch norm with `center=False`).
"""

import keras
from keras import ops

from simclr_keras.backbones import BATCH_NORM_EPSILON, BATCH_NORM_MOMENTUM


@keras.saving.register_keras_serializable(package="simclr_keras")
class ProjectionHead(keras.layers.Layer):
    """Non-linear projection head z = g(h).

    Args:
        num_layers: number of Dense + BatchNorm layers (>= 1); 2 is SimCLR v1,
            3 is SimCLR v2.
        hidden_dim: width of the hidden layers; None uses the width of the
            input h, as the official code.
        output_dim: width of z (128 in the paper).
        synchronized_batch_norm: use cross-replica batch norm.
        **kwargs: forwarded to `keras.layers.Layer` (name, dtype, ...).

    Call arguments:
        inputs: h, float tensor [B, D].
        training: selects batch statistics (True) or moving averages.

    Returns z, float32 [B, output_dim] whatever the dtype policy.
    """

    def __init__(
        self,
        num_layers=2,
        hidden_dim=None,
        output_dim=128,
        synchronized_batch_norm=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(
                "num_layers must be an integer >= 1, received "
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
        self.dense_layers = []
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
            dense = keras.layers.Dense(
                units,
                use_bias=False,
                kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
                dtype=self.dtype_policy,
                name=f"dense_{layer_index}",
            )
            batch_norm = keras.layers.BatchNormalization(
                momentum=BATCH_NORM_MOMENTUM,
                epsilon=BATCH_NORM_EPSILON,
                # No beta on the output layer: the official head builds it with
                # use_bias=False, which also turns off the batch-norm centre.
                center=not is_output_layer,
                synchronized=self.synchronized_batch_norm,
                dtype=self.dtype_policy,
                name=f"batch_norm_{layer_index}",
            )
            dense.build((None, current_dim))
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
            setattr(self, f"batch_norm_{layer_index}", batch_norm)

    def call(self, inputs, training=None):
        outputs = inputs
        for layer_index, (dense, batch_norm) in enumerate(
            zip(self.dense_layers, self.batch_norm_layers)
        ):
            outputs = batch_norm(dense(outputs), training=training)
            if layer_index < self.num_layers - 1:
                outputs = ops.relu(outputs)
        # The contrastive loss divides by a small temperature; keep it float32.
        return ops.cast(outputs, "float32")

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.output_dim,)

    def compute_output_spec(self, inputs, training=None):
        return keras.KerasTensor(
            self.compute_output_shape(inputs.shape), dtype="float32"
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_layers": self.num_layers,
                "hidden_dim": self.hidden_dim,
                "output_dim": self.output_dim,
                "synchronized_batch_norm": self.synchronized_batch_norm,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="simclr_keras")
class LinearProbe(keras.layers.Layer):
    """Linear classifier on (frozen) representations: parameter-free BatchNorm, then Dense.

    The BatchNorm has no scale or offset, so at inference (moving statistics) the probe is still an
    affine map of h; it only standardises each feature, which keeps plain SGD on the probe stable at
    the pretraining learning rate (He et al., "Masked Autoencoders Are Scalable Vision Learners",
    CVPR 2022, add the same normalisation before their linear probe). Always float32.

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
        self.classifier = keras.layers.Dense(num_classes, dtype="float32", name="classifier")

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
