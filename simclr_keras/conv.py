"""Conv2D whose kernel gradient is computed as matrix products where oneDNN's kernel for it is slow.

Why: the step profile (benchmarks/step_profile.py) of ResNet-18 in mixed_bfloat16 on a CPU put the
kernel gradient (Conv2DBackpropFilter) at almost half of all op time, most of it in the last two
groups, whose feature maps are 8x8 and 4x4 (CIFAR stem). There oneDNN's bfloat16 weight-gradient
kernel ran 2-6x slower than the same product written as k*k matrix multiplications (BENCHMARKS.md);
on larger maps, and in float32, oneDNN was as fast or faster, so only small maps take this path.
"""

import keras
import tensorflow as tf

# Largest output feature map (height x width pixels), by stride, whose kernel gradient "auto" computes
# as matmuls in bfloat16 (benchmarks/conv_kernel_gradient.py): stride 1 was 2x faster at 8x8 and 5.7x
# at 4x4 but slower at 16x16; strided windows copy slowly, and stride 2 paid only at 4x4 (1.4x).
_MATMUL_MAX_OUTPUT_PIXELS = {1: 64, 2: 16}


def kernel_gradient_as_matmuls(inputs, output_gradient, kernel_size, strides):
    """d loss / d kernel of a 'valid' 2-D convolution (NHWC), as kernel_h * kernel_w matrix products.

    For a valid convolution y[b, r, c] = sum_{i,j} x[b, s*r + i, s*c + j, :] . w[i, j], so

        dw[i, j] = sum_{b, r, c} x[b, s*r + i, s*c + j, :]^T  dy[b, r, c, :]   (C_in x C_out)

    which is one (C_in x B*H'*W') @ (B*H'*W' x C_out) product per kernel position.

    Args:
      inputs: [B, H, W, C_in] (already padded for the convolution).
      output_gradient: [B, H', W', C_out].
      kernel_size: (kernel_h, kernel_w).
      strides: (s_h, s_w).

    Returns:
      [kernel_h, kernel_w, C_in, C_out], in the inputs' dtype.
    """
    out_height, out_width = output_gradient.shape[1], output_gradient.shape[2]
    channels_in, channels_out = inputs.shape[-1], output_gradient.shape[-1]
    flat_gradient = tf.reshape(output_gradient, [-1, channels_out])  # (B*H'*W', C_out)
    rows = []
    for i in range(kernel_size[0]):
        for j in range(kernel_size[1]):
            window = inputs[
                :,
                i : i + strides[0] * (out_height - 1) + 1 : strides[0],
                j : j + strides[1] * (out_width - 1) + 1 : strides[1],
                :,
            ]  # the input pixels that kernel position (i, j) met: (B, H', W', C_in)
            rows.append(tf.matmul(tf.reshape(window, [-1, channels_in]), flat_gradient, transpose_a=True))
    return tf.reshape(tf.stack(rows), [kernel_size[0], kernel_size[1], channels_in, channels_out])


@keras.saving.register_keras_serializable(package="simclr_keras")
class MatmulGradientConv2D(keras.layers.Conv2D):
    """`keras.layers.Conv2D` (same outputs, same weights) with a faster kernel gradient on CPUs.

    Args:
      kernel_gradient: "auto" computes the kernel's gradient with `kernel_gradient_as_matmuls` when
        it pays: TensorFlow backend, bfloat16 compute, no GPU or TPU, an output map known at trace
        time of at most 8x8 pixels (stride 1) or 4x4 (stride 2). "matmul" always does where it
        can (channels_last, no dilation or groups, 'valid' padding or 'same' with stride 1 and an
        odd kernel); "native" never.
        The input gradient and the forward pass are TensorFlow's own in every case.
      **kwargs: those of `keras.layers.Conv2D`.
    """

    def __init__(self, *args, kernel_gradient="auto", **kwargs):
        super().__init__(*args, **kwargs)
        if kernel_gradient not in ("auto", "matmul", "native"):
            raise ValueError(f"kernel_gradient must be 'auto', 'matmul' or 'native', got {kernel_gradient!r}.")
        self.kernel_gradient = kernel_gradient

    def _takes_matmul_path(self, inputs):
        if self.kernel_gradient == "native" or keras.backend.backend() != "tensorflow":
            return False
        shape = inputs.shape
        if (
            self.data_format != "channels_last"
            or self.groups != 1
            or tuple(self.dilation_rate) != (1, 1)
            or shape.rank != 4
            or shape[1] is None
            or shape[2] is None
        ):
            return False
        if self.padding == "same" and (
            tuple(self.strides) != (1, 1) or any(size % 2 == 0 for size in self.kernel_size)
        ):
            return False  # TensorFlow's 'same' pads asymmetrically there; not handled
        if self.kernel_gradient == "matmul":
            return True
        if self.compute_dtype != "bfloat16":
            return False
        if tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"):
            return False  # cuDNN and XLA have good kernels of their own
        if self.padding == "same":
            output_pixels = shape[1] * shape[2]
        else:
            output_pixels = ((shape[1] - self.kernel_size[0]) // self.strides[0] + 1) * (
                (shape[2] - self.kernel_size[1]) // self.strides[1] + 1
            )
        stride = self.strides[0] if self.strides[0] == self.strides[1] else None
        return output_pixels <= _MATMUL_MAX_OUTPUT_PIXELS.get(stride, 0)

    def convolution_op(self, inputs, kernel):
        if not self._takes_matmul_path(inputs):
            return super().convolution_op(inputs, kernel)
        padding = self.padding.upper()
        strides = [1, *self.strides, 1]
        half = [(size - 1) // 2 for size in self.kernel_size]  # 'same', stride 1, odd kernel: symmetric

        @tf.custom_gradient
        def convolve(inputs, kernel):
            outputs = tf.nn.conv2d(inputs, kernel, strides, padding)

            def gradient(output_gradient):
                with tf.name_scope(self.name):  # so that profiles attribute these ops to the layer
                    input_gradient = tf.raw_ops.Conv2DBackpropInput(
                        input_sizes=tf.shape(inputs),
                        filter=kernel,
                        out_backprop=output_gradient,
                        strides=strides,
                        padding=padding,
                    )
                    padded = inputs
                    if padding == "SAME":
                        padded = tf.pad(inputs, [[0, 0], [half[0], half[0]], [half[1], half[1]], [0, 0]])
                    kernel_gradient = kernel_gradient_as_matmuls(
                        padded, output_gradient, self.kernel_size, self.strides
                    )
                return input_gradient, kernel_gradient

            return outputs, gradient

        # A tensor, not the variable: the custom gradient then flows on to the variable by the read.
        return convolve(inputs, tf.convert_to_tensor(kernel))

    def get_config(self):
        return {**super().get_config(), "kernel_gradient": self.kernel_gradient}
