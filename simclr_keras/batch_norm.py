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

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="simclr_keras")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` whose training step runs TensorFlow's fused kernel.

    Falls back to Keras' computation where the kernel does not apply: inference, synchronized
    statistics, masks, renormalisation, inputs that are not [batch, height, width, channels] with
    `axis=-1`, and backends other than TensorFlow.
    """

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
