"""Selective-kernel convolution of SimCLR v2's *_sk1 ResNets (Li et al., arXiv:1903.06586).

SimCLR v2 (Chen et al., arXiv:2006.10029, Section 3) replaces the 3x3 convolution of every
bottleneck block by a selective-kernel unit. As in the official google-research/simclr (tf2)
`SK_Conv2D`, both streams are 3x3 convolutions (computed as one convolution of twice the
filters, then split), and a small attention branch on their globally pooled sum picks, per
channel, a softmax mixture of the two streams.
"""

import keras
from keras import ops

from simclr_keras.batch_norm import FusedBatchNormalization
from simclr_keras.conv import MatmulGradientConv2D

# The official settings: batch norm as in the rest of the ResNet, an attention width of at least 32.
_BATCH_NORM_MOMENTUM = 0.9
_BATCH_NORM_EPSILON = 1e-5
_MINIMUM_ATTENTION_DIM = 32


def _kernel_initializer():
    return keras.initializers.VarianceScaling(scale=1.0, mode="fan_in", distribution="truncated_normal")


@keras.saving.register_keras_serializable(package="simclr_keras")
class SelectiveKernelConv2D(keras.layers.Layer):
    """Two 3x3 streams mixed by a per-channel softmax attention; ends with batch norm + ReLU inside.

    Args:
        filters: int; output channels (each stream has as many).
        strides: int; 1 or 2, applied by both streams (symmetric fixed padding when 2).
        ratio: float; attention width = max(int(filters * ratio), 32) (official `sk_ratio`, 0.0625).
        synchronized_batch_norm: bool; cross-replica batch norm.
        **kwargs: `keras.layers.Layer`'s (name, dtype, ...).

    Call arguments:
        inputs: float tensor [B, H, W, C_in].
        training: batch statistics (True) or moving averages.

    Returns [B, H / strides, W / strides, filters].
    """

    def __init__(self, filters, strides=1, ratio=0.0625, synchronized_batch_norm=False, **kwargs):
        super().__init__(**kwargs)
        if isinstance(filters, bool) or not isinstance(filters, int) or filters < 1:
            raise ValueError(f"filters must be a positive integer, received filters={filters!r}.")
        if strides not in (1, 2):
            raise ValueError(f"strides must be 1 or 2, received strides={strides!r}.")
        if not 0 < ratio < 1:
            raise ValueError(f"ratio must be in (0, 1) (0.0625 in SimCLR v2), received ratio={ratio!r}.")
        self.filters = filters
        self.strides = strides
        self.ratio = float(ratio)
        self.synchronized_batch_norm = bool(synchronized_batch_norm)
        self.attention_dim = max(int(filters * ratio), _MINIMUM_ATTENTION_DIM)
        self.conv = MatmulGradientConv2D(
            2 * filters, 3, strides=strides, padding="same" if strides == 1 else "valid", use_bias=False,
            kernel_initializer=_kernel_initializer(), dtype=self.dtype_policy, name="conv",
        )
        self.batch_norm = self._batch_norm("batch_norm")
        self.attention_reduce = MatmulGradientConv2D(
            self.attention_dim, 1, use_bias=False, kernel_initializer=_kernel_initializer(),
            dtype=self.dtype_policy, name="attention_reduce",
        )
        self.attention_batch_norm = self._batch_norm("attention_batch_norm")
        self.attention_expand = MatmulGradientConv2D(
            2 * filters, 1, use_bias=False, kernel_initializer=_kernel_initializer(),
            dtype=self.dtype_policy, name="attention_expand",
        )

    def _batch_norm(self, name):
        return FusedBatchNormalization(
            momentum=_BATCH_NORM_MOMENTUM, epsilon=_BATCH_NORM_EPSILON, synchronized=self.synchronized_batch_norm,
            dtype=self.dtype_policy, name=name,
        )

    def build(self, input_shape):
        batch, height, width, channels = input_shape
        self.conv.build((batch, None, None, channels))
        self.batch_norm.build((batch, None, None, 2 * self.filters))
        self.attention_reduce.build((batch, 1, 1, self.filters))
        self.attention_batch_norm.build((batch, 1, 1, self.attention_dim))
        self.attention_expand.build((batch, 1, 1, self.attention_dim))

    def _split_streams(self, tensor):
        # [B, H, W, 2F] -> [2, B, H, W, F]: channels [0, F) are stream 0, [F, 2F) stream 1.
        return ops.stack(ops.split(tensor, 2, axis=-1), axis=0)

    def call(self, inputs, training=None):
        if self.strides > 1:
            inputs = ops.pad(inputs, [[0, 0], [1, 1], [1, 1], [0, 0]])  # (k - 1) // 2 = 1 on each side
        streams = ops.relu(self.batch_norm(self.conv(inputs), training=training))
        streams = self._split_streams(streams)  # (2, B, H', W', F)
        pooled = ops.mean(ops.sum(streams, axis=0), axis=(1, 2), keepdims=True)  # (B, 1, 1, F)
        attention = ops.relu(self.attention_batch_norm(self.attention_reduce(pooled), training=training))
        mixing = ops.softmax(self._split_streams(self.attention_expand(attention)), axis=0)  # (2, B, 1, 1, F)
        return ops.sum(streams * mixing, axis=0)  # (B, H', W', F)

    def compute_output_shape(self, input_shape):
        batch, height, width, _ = input_shape

        def reduced(size):
            return None if size is None else (size - 1) // self.strides + 1

        return (batch, reduced(height), reduced(width), self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "strides": self.strides,
                "ratio": self.ratio,
                "synchronized_batch_norm": self.synchronized_batch_norm,
            }
        )
        return config
