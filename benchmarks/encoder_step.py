"""One ResNet-18 training step with and without MatmulGradientConv2D's matmul kernel gradient (issue 7).

Builds two identical encoders (ResNet-18, CIFAR stem) in one process: one with every convolution's
kernel gradient left to TensorFlow ("native"), one as the package builds it ("auto"). Each step is a
forward and backward pass over a batch of random 32x32 images and a momentum SGD update; the two
alternate A B A B, and the script prints the medians and the median of the paired ratios.

    python benchmarks/encoder_step.py --precision=mixed_bfloat16
"""

import statistics
import time

from absl import app, flags

flags.DEFINE_enum("precision", "mixed_bfloat16", ["float32", "mixed_bfloat16"], "Keras dtype policy.")
flags.DEFINE_integer("batch_size", 256, "Images per step (2 x the training batch of 128).")
flags.DEFINE_integer("rounds", 8, "Timed A B rounds (after two warm-up steps of each).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import keras
    import tensorflow as tf

    from simclr_keras import backbones
    from simclr_keras.conv import MatmulGradientConv2D

    keras.mixed_precision.set_dtype_policy(FLAGS.precision)

    def make_step(kernel_gradient):
        keras.utils.set_random_seed(0)
        encoder = backbones.resnet(18, image_size=32)
        for layer in encoder.layers:
            if isinstance(layer, MatmulGradientConv2D):
                layer.kernel_gradient = kernel_gradient
        optimizer = keras.optimizers.SGD(0.01, momentum=0.9)

        @tf.function
        def step(images):
            with tf.GradientTape() as tape:
                representation = tf.cast(encoder(images, training=True), tf.float32)
                loss = tf.reduce_mean(tf.square(representation))
            gradients = tape.gradient(loss, encoder.trainable_variables)
            optimizer.apply_gradients(zip(gradients, encoder.trainable_variables))
            return loss

        return step

    images = tf.random.uniform([FLAGS.batch_size, 32, 32, 3], seed=0)
    steps = {"native": make_step("native"), "auto": make_step("auto")}
    for step in steps.values():
        step(images)
        step(images)
    seconds = {name: [] for name in steps}
    for _ in range(FLAGS.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            float(step(images))
            seconds[name].append(time.perf_counter() - start)
    native, auto = (statistics.median(seconds[name]) for name in ("native", "auto"))
    paired = statistics.median(a / b for a, b in zip(seconds["native"], seconds["auto"]))
    print(f"{FLAGS.precision}, ResNet-18 step on {FLAGS.batch_size} images, {FLAGS.rounds} rounds")
    print("| kernel gradient | seconds per step (median) | images/s |\n|---|---:|---:|")
    for name, value in (("TensorFlow's (native)", native), ("MatmulGradientConv2D (auto)", auto)):
        print(f"| {name} | {value:.2f} | {FLAGS.batch_size / value:.1f} |")
    print(f"\nspeed-up: {native / auto:.2f}x (medians), {paired:.2f}x (median of paired rounds)")


if __name__ == "__main__":
    app.run(main)
