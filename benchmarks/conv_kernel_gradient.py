"""The kernel gradient of ResNet-18's 3x3 convolutions: oneDNN's kernel against matrix products (issue 7).

For each 3x3 convolution shape of ResNet-18 with the CIFAR stem (a batch of 256 views of 32x32
images: stride 1 on feature maps 32x32x64, 16x16x128, 8x8x256, 4x4x512, and the stride-2
convolutions that enter the last three stages, on explicitly padded inputs), times TensorFlow's
Conv2DBackpropFilter and
`simclr_keras.conv.kernel_gradient_as_matmuls` on the same tensors, alternating A B A B, and prints
the medians. `MatmulGradientConv2D` takes the matmul path only where this table says it pays.

    python benchmarks/conv_kernel_gradient.py --precision=mixed_bfloat16
    python benchmarks/conv_kernel_gradient.py --precision=float32
"""

import statistics
import time

from absl import app, flags

flags.DEFINE_enum("precision", "mixed_bfloat16", ["float32", "mixed_bfloat16"], "Compute dtype of the tensors.")
flags.DEFINE_integer("batch_size", 256, "Views per step (2 x the training batch).")
flags.DEFINE_integer("repeats", 9, "Timed calls of each (after one warm-up call).")
FLAGS = flags.FLAGS

# (input side, input channels, output channels, stride): stride 1 is 'same', stride 2 'valid' on an
# input padded by one pixel on each side, as simclr_keras.backbones builds them.
SHAPES = [
    (32, 64, 64, 1), (16, 128, 128, 1), (8, 256, 256, 1), (4, 512, 512, 1),
    (34, 64, 128, 2), (18, 128, 256, 2), (10, 256, 512, 2),
]  # fmt: skip


def main(argv):
    del argv
    import tensorflow as tf

    from simclr_keras.conv import kernel_gradient_as_matmuls

    dtype = tf.bfloat16 if FLAGS.precision == "mixed_bfloat16" else tf.float32
    print(f"{FLAGS.precision}, batch {FLAGS.batch_size}, 3x3 kernels, median of {FLAGS.repeats} (ms)")
    print("| input -> output | GFLOP | Conv2DBackpropFilter | k*k matmuls | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for side, channels_in, channels_out, stride in SHAPES:
        out_side = side if stride == 1 else (side - 3) // stride + 1
        padding = "SAME" if stride == 1 else "VALID"
        inputs = tf.cast(tf.random.normal([FLAGS.batch_size, side, side, channels_in]), dtype)
        output_gradient = tf.cast(tf.random.normal([FLAGS.batch_size, out_side, out_side, channels_out]), dtype)

        @tf.function
        def native(inputs, output_gradient, shape=(3, 3, channels_in, channels_out), stride=stride, padding=padding):
            return tf.raw_ops.Conv2DBackpropFilter(
                input=inputs, filter_sizes=list(shape), out_backprop=output_gradient,
                strides=[1, stride, stride, 1], padding=padding,
            )  # fmt: skip

        @tf.function
        def matmuls(inputs, output_gradient, stride=stride):
            if stride == 1:  # 'same': pad here, as MatmulGradientConv2D does
                inputs = tf.pad(inputs, [[0, 0], [1, 1], [1, 1], [0, 0]])
            return kernel_gradient_as_matmuls(inputs, output_gradient, (3, 3), (stride, stride))

        reference = tf.cast(native(inputs, output_gradient), tf.float32)
        difference = tf.reduce_max(tf.abs(tf.cast(matmuls(inputs, output_gradient), tf.float32) - reference))
        relative = float(difference / tf.reduce_max(tf.abs(reference)))
        if relative > 1e-2:
            raise SystemExit(f"error: the two kernel gradients differ by {relative:.3g} (relative) at {side}x{side}.")
        seconds = {native: [], matmuls: []}
        for _ in range(FLAGS.repeats):
            for function in (native, matmuls):
                start = time.perf_counter()
                function(inputs, output_gradient).numpy()
                seconds[function].append(time.perf_counter() - start)
        a, b = statistics.median(seconds[native]), statistics.median(seconds[matmuls])
        gflop = 2 * FLAGS.batch_size * out_side * out_side * 9 * channels_in * channels_out / 1e9
        name = f"{side}x{side}x{channels_in} -> {out_side}x{out_side}x{channels_out}" + (" (stride 2)" if stride == 2 else "")
        print(f"| {name} | {gflop:.1f} | {1e3 * a:.0f} | {1e3 * b:.0f} | {a / b:.2f}x |")


if __name__ == "__main__":
    app.run(main)
