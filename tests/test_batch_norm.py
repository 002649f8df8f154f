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
    # x - mean is computed from rounded operands: its error scales with |x| + |mean|, not |x - mean|.
    normalised_magnitude = (np.abs(x) + np.abs(mean)) * inverse_std
    dy = output_gradient
    input_gradient = gamma * inverse_std * (
        dy - dy.mean(axis=axes) - normalised * (dy * normalised).mean(axis=axes)
    )
    input_magnitude = np.abs(gamma) * inverse_std * (
        np.abs(dy) + np.abs(dy).mean(axis=axes) + normalised_magnitude * (np.abs(dy) * normalised_magnitude).mean(axis=axes)
    )
    return {
        "outputs": (gamma * normalised + beta, np.abs(gamma) * normalised_magnitude + np.abs(beta)),
        "input gradient": (input_gradient, input_magnitude),
        "gamma gradient": ((dy * normalised).sum(axis=axes), (np.abs(dy) * normalised_magnitude).sum(axis=axes)),
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


@pytest.mark.parametrize("shape", [(12, 3, 3, 4), (12, 5)], ids=["images", "features"])
def test_batch_norm_groups_normalise_each_block_with_its_own_statistics(shape):
    from simclr_keras.batch_norm import batch_norm_groups

    rng = np.random.default_rng(5)
    # Blocks with very different means and scales, so that whole-batch statistics would be far off.
    values = rng.normal(size=shape) * np.repeat([1.0, 4.0, 0.5], 4).reshape((-1,) + (1,) * (len(shape) - 1))
    values = (values + np.repeat([0.0, 10.0, -3.0], 4).reshape((-1,) + (1,) * (len(shape) - 1))).astype(np.float32)
    layer = FusedBatchNormalization(momentum=0.9, epsilon=1e-5)
    layer.build(shape)
    gamma = rng.uniform(0.5, 1.5, size=shape[-1]).astype(np.float32)
    beta = rng.normal(size=shape[-1]).astype(np.float32)
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    with batch_norm_groups([layer], 3):
        outputs = layer(tf.constant(values), training=True).numpy()
    # By hand, block by block, in float64.
    blocks = values.astype(np.float64).reshape((3, 4) + shape[1:])
    axes = tuple(range(1, len(shape)))  # the block's examples (and pixels), per channel
    means, variances = blocks.mean(axis=axes, keepdims=True), blocks.var(axis=axes, keepdims=True)
    expected = ((blocks - means) / np.sqrt(variances + 1e-5) * gamma + beta).reshape(shape)
    np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-4)
    # The moving statistics move once, towards the mean over the blocks of their statistics.
    channel_means = means.reshape(3, -1).mean(axis=0)
    channel_variances = variances.reshape(3, -1).mean(axis=0)
    np.testing.assert_allclose(layer.moving_mean.numpy(), 0.1 * channel_means, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), 0.9 + 0.1 * channel_variances, rtol=1e-4)
    # Outside the block, and in inference mode, the layer is Keras' BatchNormalization again.
    assert layer.batch_groups == 1
    with batch_norm_groups([layer], 3):
        inference = layer(tf.constant(values), training=False).numpy()
    moving = ((values - layer.moving_mean.numpy()) / np.sqrt(layer.moving_variance.numpy() + 1e-5)) * gamma + beta
    np.testing.assert_allclose(inference, moving, rtol=1e-4, atol=1e-4)


def test_batch_norm_groups_reject_a_batch_that_does_not_split():
    from simclr_keras.batch_norm import batch_norm_groups

    layer = FusedBatchNormalization()
    layer.build((10, 4))
    with pytest.raises(ValueError, match="batch_groups=3"):
        with batch_norm_groups([layer], 3):
            layer(tf.zeros((10, 4)), training=True)
    with pytest.raises(ValueError, match="groups=0"):
        with batch_norm_groups([layer], 0):
            pass
