"""BatchNormalization that trains with TensorFlow's fused kernel: the same layer, about 1.4x faster.

Keras 3's BatchNormalization computes a training step from separate ops (moments, then normalise,
then scale and shift; each a pass over the activations, and as many again for the gradient), and
under mixed precision casts every activation to float32 and back. On CPUs, where these passes are
memory-bound, they cost as much as the convolutions: a ResNet-18 training step on 256 CIFAR images
took 1.4x longer with them than with TensorFlow's fused kernel, in float32 and in bfloat16
(BENCHMARKS.md). `FusedBatchNormalization` uses that kernel (`FusedBatchNormV3`: one pass forward,
one backward, bfloat16/float16 activations with float32 statistics) for training on 4-D
channels-last inputs, and is otherwise Keras' layer: same variables and checkpoints, same moving
statistics (the biased batch variance, as Keras), same inference path, and the synchronized
(cross-replica) variant is left to Keras.
"""

import contextlib

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="simclr_keras")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` whose training step runs TensorFlow's fused kernel.

    Falls back to Keras' computation where the kernel does not apply: inference, synchronized
    statistics, masks, renormalisation, inputs that are not [batch, height, width, channels] with
    `axis=-1`, and backends other than TensorFlow.

    Inside `batch_norm_groups(layers, groups)` a training-mode call normalises each of `groups`
    consecutive blocks of the batch with that block's own statistics (MoCo's split BatchNorm).
    """

    # Set only for the duration of a `batch_norm_groups` block (read when a call is traced).
    batch_groups = 1

    def _fused_applies(self, inputs, training, mask):
        return (
            training
            and self.trainable
            and not self.synchronized
            and not self.renorm
            and mask is None
            and keras.backend.backend() == "tensorflow"
            and len(inputs.shape) == 4
            and self.axis in (-1, 3)
        )

    def call(self, inputs, training=None, mask=None):
        if self.batch_groups > 1 and training and self.trainable and mask is None and not self.renorm:
            return self._grouped_call(inputs)
        if not self._fused_applies(inputs, training, mask):
            return super().call(inputs, training=training, mask=mask)
        channels = inputs.shape[-1]
        scale = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones([channels], tf.float32)
        offset = tf.cast(self.beta, tf.float32) if self.center else tf.zeros([channels], tf.float32)
        inputs = tf.cast(inputs, self.compute_dtype)  # float32, bfloat16 or float16: all the kernel takes
        # The kernel computes in float32 whatever the activations' dtype. With empty running
        # statistics and an averaging factor of 1 it returns this batch's mean and variance.
        empty = tf.constant([], tf.float32)
        outputs, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
            x=inputs,
            scale=scale,
            offset=offset,
            mean=empty,
            variance=empty,
            epsilon=self.epsilon,
            exponential_avg_factor=1.0,
            data_format="NHWC",
            is_training=True,
        )
        # The kernel's variance output has Bessel's correction; Keras averages the biased one.
        count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), tf.float32)
        variance = variance * (count - 1.0) / tf.maximum(count, 2.0)
        momentum = self.momentum
        self.moving_mean.assign(tf.cast(self.moving_mean, tf.float32) * momentum + mean * (1.0 - momentum))
        self.moving_variance.assign(
            tf.cast(self.moving_variance, tf.float32) * momentum + variance * (1.0 - momentum)
        )
        return tf.cast(outputs, self.compute_dtype)

    def _grouped_call(self, inputs):
        """Training step with one set of statistics per block of the batch (inputs [B, ..., C]).

        As the MoCo CIFAR-10 demo's SplitBatchNorm: each of the G = `batch_groups` consecutive blocks
        of B / G examples is normalised by its own mean and variance (gathered over the replicas'
        corresponding blocks when synchronized), and the moving statistics move once per call,
        towards the mean over the blocks of their statistics.
        """
        groups = self.batch_groups
        batch_size = inputs.shape[0]
        if batch_size is not None and batch_size % groups:
            raise ValueError(
                f"{self.name}: the batch of {batch_size} does not split into batch_groups={groups} equal groups; "
                "use a batch size divisible by the number of BatchNorm groups."
            )
        if self.axis not in (-1, len(inputs.shape) - 1):
            raise ValueError(f"{self.name}: grouped statistics need channels last, got axis={self.axis}.")
        values = tf.cast(inputs, tf.float32)
        shape = tf.shape(values)
        grouped = tf.reshape(values, tf.concat([[groups, -1], shape[1:]], axis=0))  # (G, B/G, ..., C)
        axes = list(range(1, len(inputs.shape)))  # everything but the group and the channel
        mean, variance = keras.ops.moments(grouped, axes=axes, keepdims=True, synchronized=self.synchronized)
        scale = tf.cast(self.gamma, tf.float32) if self.scale else None
        offset = tf.cast(self.beta, tf.float32) if self.center else None
        outputs = tf.nn.batch_normalization(grouped, mean, variance, offset, scale, self.epsilon)
        momentum = self.momentum
        group_axes = list(range(len(inputs.shape)))  # (G, 1, ..., 1, C) -> (C,)
        self.moving_mean.assign(
            tf.cast(self.moving_mean, tf.float32) * momentum + tf.reduce_mean(mean, axis=group_axes) * (1.0 - momentum)
        )
        self.moving_variance.assign(
            tf.cast(self.moving_variance, tf.float32) * momentum
            + tf.reduce_mean(variance, axis=group_axes) * (1.0 - momentum)
        )
        return tf.cast(tf.reshape(outputs, shape), self.compute_dtype)


@contextlib.contextmanager
def batch_norm_groups(layers, groups):
    """Within the block, training-mode calls of the `FusedBatchNormalization` layers inside `layers`
    (layers or models) normalise each of `groups` consecutive blocks of their batch separately.

    MoCo uses it to emulate per-device BatchNorm on one device (the CIFAR-10 demo's SplitBatchNorm):
    `with batch_norm_groups([encoder], 8): encoder(images, training=True)`. Outside the block, and in
    inference mode, the layers are unchanged; the setting is read when a call is traced, so it holds
    for the calls made inside the block, compiled or not.
    """
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive integer, got groups={groups!r}.")
    batch_norms = [
        layer
        for container in layers
        for layer in container._flatten_layers(include_self=True, recursive=True)
        if isinstance(layer, FusedBatchNormalization)
    ]
    for layer in batch_norms:
        layer.batch_groups = groups
    try:
        yield
    finally:
        for layer in batch_norms:
            layer.batch_groups = 1
