"""FusedBatchNormalization against Keras' own BatchNormalization, the reference it must equal."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from precision import assert_within_rounding, round_to
from simclr_keras.batch_norm import FusedBatchNormalization


@pytest.fixture
def policy(request):
    keras.mixed_precision.set_dtype_policy(request.param)
    yield request.param
    keras.mixed_precision.set_dtype_policy("float32")


def _pair(shape, **kwargs):
    reference = keras.layers.BatchNormalization(
        momentum=0.9, epsilon=1e-5, gamma_initializer="random_normal", beta_initializer="random_normal", **kwargs
    )
    fused = FusedBatchNormalization(momentum=0.9, epsilon=1e-5, **kwargs)
    reference.build(shape)
    fused.build(shape)
    fused.set_weights(reference.get_weights())
    return reference, fused


def exact_training_step(x, gamma, beta, output_gradient, epsilon=1e-5):
    """A BatchNorm training step in float64 from the closed forms, and the same expressions on absolute
    values (the scale rounding errors are bounded by; tests/precision.py).

    Returns {name: (exact, magnitude)} for the outputs and the gradients of sum(outputs * output_gradient)
    with respect to the inputs, gamma and beta. Statistics over batch, height and width.
    """
    axes = (0, 1, 2)
    mean, variance = x.mean(axis=axes), x.var(axis=axes)
    inverse_std = 1.0 / np.sqrt(variance + epsilon)
    normalised = (x - mean) * inverse_std
    dy = output_gradient
    input_gradient = gamma * inverse_std * (
        dy - dy.mean(axis=axes) - normalised * (dy * normalised).mean(axis=axes)
    )
    input_magnitude = np.abs(gamma) * inverse_std * (
        np.abs(dy) + np.abs(dy).mean(axis=axes) + np.abs(normalised) * np.abs(dy * normalised).mean(axis=axes)
    )
    return {
        "outputs": (gamma * normalised + beta, np.abs(gamma * normalised) + np.abs(beta)),
        "input gradient": (input_gradient, input_magnitude),
        "gamma gradient": ((dy * normalised).sum(axis=axes), np.abs(dy * normalised).sum(axis=axes)),
        "beta gradient": (dy.sum(axis=axes), np.abs(dy).sum(axis=axes)),
    }


@pytest.mark.parametrize(
    "policy",
    ["float32", pytest.param("mixed_bfloat16", marks=pytest.mark.bfloat16)],
    indirect=True,
)
def test_training_step_is_exact_to_rounding_like_keras_outputs_gradients_and_moving_statistics(policy):
    # Both FusedBatchNormalization and Keras' layer are held to the float64 closed form computed from the
    # same inputs as the layer sees them (rounded to the compute dtype), within what that dtype's
    # arithmetic allows for a reduction over the 120 values of each channel.
    compute_dtype = keras.mixed_precision.dtype_policy().compute_dtype
    rng = np.random.default_rng(0)
    images = round_to(rng.normal(size=(6, 5, 4, 3)) * 3 + 2, compute_dtype)
    output_gradient = round_to(rng.normal(size=images.shape), compute_dtype)  # exact in the compute dtype
    reference, fused = _pair(images.shape)
    gamma, beta = (value.astype(np.float64) for value in reference.get_weights()[:2])
    expected = exact_training_step(images, gamma, beta, output_gradient)
    for implementation, layer in (("keras", reference), ("fused", fused)):
        inputs = tf.constant(images, compute_dtype)
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            outputs = layer(inputs, training=True)
            loss = tf.reduce_sum(tf.cast(outputs, tf.float64) * output_gradient)
        assert outputs.dtype == compute_dtype
        computed = [outputs, *tape.gradient(loss, [inputs, layer.gamma, layer.beta])]
        for (name, (exact, magnitude)), value in zip(expected.items(), computed):
            value = tf.cast(value, tf.float64).numpy()
            assert_within_rounding(value, exact, magnitude, images[..., 0].size, compute_dtype, f"{implementation} {name}")
        # Moving statistics (float32 variables): 0.9 * initial (0 and 1) + 0.1 * the batch's mean and
        # biased variance.
        batch = images.reshape(-1, 3)
        np.testing.assert_allclose(layer.moving_mean.numpy(), 0.1 * batch.mean(axis=0), rtol=1e-5)
        np.testing.assert_allclose(layer.moving_variance.numpy(), 0.9 + 0.1 * batch.var(axis=0), rtol=1e-5)


def test_inference_and_unsupported_inputs_use_keras_computation():
    rng = np.random.default_rng(1)
    features = tf.constant(rng.normal(size=(8, 3)).astype(np.float32))  # 2-D: not the fused kernel's layout
    reference, fused = _pair(features.shape)
    np.testing.assert_allclose(fused(features, training=True), reference(features, training=True), atol=1e-6)
    images = tf.constant(rng.normal(size=(2, 3, 3, 3)).astype(np.float32))
    reference, fused = _pair(images.shape)
    np.testing.assert_allclose(fused(images, training=False), reference(images, training=False), atol=1e-6)
    assert keras.layers.deserialize(keras.layers.serialize(fused)).__class__ is FusedBatchNormalization
