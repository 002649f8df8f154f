"""MatmulGradientConv2D against Keras' own Conv2D: same outputs, same gradients (TensorFlow's autodiff)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from config_round_trip import assert_config_round_trip
from precision import assert_within_rounding, round_to
from simclr_keras.conv import MatmulGradientConv2D


def outputs_and_gradients_tensors(layer, images):
    with tf.GradientTape() as tape:
        tape.watch(images)
        outputs = layer(images)
        loss = tf.reduce_sum(tf.cast(outputs, tf.float32) * tf.cos(tf.cast(outputs, tf.float32)))  # a non-linear loss
    input_gradient, kernel_gradient = tape.gradient(loss, [images, layer.kernel])
    return [tf.cast(tensor, tf.float32) for tensor in (outputs, input_gradient, kernel_gradient)]


def outputs_and_gradients(layer, images):
    return [tensor.numpy() for tensor in outputs_and_gradients_tensors(layer, images)]


def twin_layers(images, **conv_arguments):
    keras_layer = keras.layers.Conv2D(use_bias=False, **conv_arguments)
    ours = MatmulGradientConv2D(use_bias=False, kernel_gradient="matmul", **conv_arguments)
    keras_layer.build(images.shape)
    ours.build(images.shape)
    ours.set_weights(keras_layer.get_weights())
    return keras_layer, ours


@pytest.mark.parametrize(
    "size,filters,kernel_size,strides,padding",
    [
        (4, 16, 3, 1, "same"),  # ResNet-18's last group on 32x32 images
        (10, 16, 3, 2, "valid"),  # the strided conv into it (after explicit padding)
        (9, 6, 3, 2, "valid"),  # odd size: the last row and column are never read
        (5, 6, 1, 1, "same"),
        (6, 5, 5, 1, "same"),
        (7, 4, (3, 1), (2, 1), "valid"),
    ],
)
def test_matches_keras_conv2d_and_its_gradients(size, filters, kernel_size, strides, padding):
    images = tf.constant(np.random.default_rng(size).normal(size=(3, size, size, 8)), tf.float32)
    keras_layer, ours = twin_layers(images, filters=filters, kernel_size=kernel_size, strides=strides, padding=padding)
    expected = outputs_and_gradients(keras_layer, images)
    got = outputs_and_gradients(ours, images)
    for name, want, have in zip(("outputs", "input gradient", "kernel gradient"), expected, got):
        assert np.abs(want).max() > 1e-2, name
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=name)


def test_matches_inside_a_compiled_function_with_an_unknown_batch_size():
    images = tf.constant(np.random.default_rng(0).normal(size=(5, 4, 4, 8)), tf.float32)
    keras_layer, ours = twin_layers(images, filters=12, kernel_size=3, padding="same")
    signature = [tf.TensorSpec([None, 4, 4, 8], tf.float32)]
    expected = tf.function(lambda x: outputs_and_gradients_tensors(keras_layer, x), input_signature=signature)
    got = tf.function(lambda x: outputs_and_gradients_tensors(ours, x), input_signature=signature)
    for want, have in zip(expected(images), got(images)):
        want, have = want.numpy(), have.numpy()
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def exact_convolution_and_gradients(images, kernel, output_gradient):
    """Forward pass, input gradient and kernel gradient of a 'same' stride-1 convolution, in float64,
    and the same three products of the operands' absolute values (the scale rounding errors are
    bounded by; tests/precision.py)."""

    def products(x, w, g):
        x, w, g = (tf.constant(a, tf.float64) for a in (x, w, g))
        outputs = tf.nn.conv2d(x, w, 1, "SAME")
        input_gradient = tf.raw_ops.Conv2DBackpropInput(
            input_sizes=x.shape, filter=w, out_backprop=g, strides=[1, 1, 1, 1], padding="SAME"
        )
        kernel_gradient = tf.raw_ops.Conv2DBackpropFilter(
            input=x, filter_sizes=w.shape, out_backprop=g, strides=[1, 1, 1, 1], padding="SAME"
        )
        return [tensor.numpy() for tensor in (outputs, input_gradient, kernel_gradient)]

    return products(images, kernel, output_gradient), products(*map(np.abs, (images, kernel, output_gradient)))


def bfloat16_outputs_and_gradients(layer, images, output_gradient):
    """Output, input gradient and kernel gradient of `layer` under mixed_bfloat16 for the linear loss
    sum(outputs * output_gradient), whose gradient with respect to the outputs is output_gradient itself."""
    images = tf.constant(images, tf.bfloat16)
    with tf.GradientTape() as tape:
        tape.watch(images)
        outputs = layer(images)
        loss = tf.reduce_sum(tf.cast(outputs, tf.float64) * output_gradient)
    input_gradient, kernel_gradient = tape.gradient(loss, [images, layer.kernel])
    return [tf.cast(tensor, tf.float64).numpy() for tensor in (outputs, input_gradient, kernel_gradient)]


@pytest.mark.bfloat16
def test_mixed_bfloat16_auto_gradient_is_exact_to_bfloat16_rounding():
    # Under mixed_bfloat16 on a CPU "auto" takes the matmul path on a 4x4 map. Both it and Keras' Conv2D
    # are held to the float64 answer computed from the same bfloat16-rounded inputs, weights and
    # output gradient, within what bfloat16 arithmetic allows for each product's reduction length.
    rng = np.random.default_rng(1)
    batch, size, channels, filters, kernel_size = 16, 4, 32, 32, 3
    images = round_to(rng.normal(size=(batch, size, size, channels)), "bfloat16")
    output_gradient = round_to(rng.normal(size=(batch, size, size, filters)), "bfloat16")
    kernel = round_to(rng.normal(size=(kernel_size, kernel_size, channels, filters)) / 10, "bfloat16")
    exact, magnitude = exact_convolution_and_gradients(images, kernel, output_gradient)
    reduction_lengths = {
        "outputs": kernel_size**2 * channels,
        "input gradient": kernel_size**2 * filters,
        "kernel gradient": batch * size * size,
    }
    policy = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        keras_layer = keras.layers.Conv2D(filters, kernel_size, padding="same", use_bias=False)
        ours = MatmulGradientConv2D(filters, kernel_size, padding="same", use_bias=False)
        for layer in (keras_layer, ours):
            layer.build(images.shape)
            layer.set_weights([kernel.astype(np.float32)])  # bfloat16-representable: the cast is exact
        assert ours._takes_matmul_path(tf.constant(images, tf.bfloat16))
        results = {
            "keras": bfloat16_outputs_and_gradients(keras_layer, images, output_gradient),
            "ours": bfloat16_outputs_and_gradients(ours, images, output_gradient),
        }
    finally:
        keras.mixed_precision.set_dtype_policy(policy)
    for implementation, computed in results.items():
        for (name, length), want, have, scale in zip(reduction_lengths.items(), exact, computed, magnitude):
            assert_within_rounding(have, want, scale, length, "bfloat16", f"{implementation} {name}")


def test_config_round_trip_and_a_bad_choice():
    layer = MatmulGradientConv2D(4, 3, padding="same", kernel_gradient="native", name="c")
    restored = assert_config_round_trip(layer, filters=4, kernel_size=(3, 3), padding="same", kernel_gradient="native")
    assert restored.kernel_gradient == "native" and restored.filters == 4 and restored.padding == "same"
    with pytest.raises(ValueError, match="kernel_gradient"):
        MatmulGradientConv2D(4, 3, kernel_gradient="fast")
