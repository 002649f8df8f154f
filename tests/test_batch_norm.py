"""FusedBatchNormalization against Keras' own BatchNormalization, the reference it must equal."""

import keras
import numpy as np
import pytest
import tensorflow as tf

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


@pytest.mark.parametrize(
    "policy, tolerance", [("float32", 1e-5), ("mixed_bfloat16", 3e-2)], indirect=["policy"]
)
def test_training_step_matches_keras_outputs_gradients_and_moving_statistics(policy, tolerance):
    rng = np.random.default_rng(0)
    images = tf.constant((rng.normal(size=(6, 5, 4, 3)) * 3 + 2).astype(np.float32))
    reference, fused = _pair(images.shape)
    weights = tf.constant(rng.normal(size=(6, 5, 4, 3)).astype(np.float32))  # a loss that weighs every output
    results = []
    for layer in (reference, fused):
        with tf.GradientTape() as tape:
            tape.watch(images)
            outputs = layer(images, training=True)
            loss = tf.reduce_sum(tf.cast(outputs, tf.float32) * weights)
        gradients = tape.gradient(loss, [images, layer.gamma, layer.beta])
        results.append((outputs, gradients, layer.get_weights()[2:]))
    (reference_out, reference_grads, reference_moving), (fused_out, fused_grads, fused_moving) = results
    assert fused_out.dtype == reference_out.dtype == keras.mixed_precision.dtype_policy().compute_dtype
    np.testing.assert_allclose(np.float32(fused_out), np.float32(reference_out), atol=tolerance)
    for expected, actual in zip(reference_grads, fused_grads):
        np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=tolerance, atol=tolerance)
    # Moving statistics: 0.9 * initial (0 and 1) + 0.1 * the batch's mean and biased variance.
    # (The layer sees its inputs in the compute dtype: bfloat16-rounded under mixed_bfloat16.)
    seen = tf.cast(tf.cast(images, keras.mixed_precision.dtype_policy().compute_dtype), tf.float32)
    batch = seen.numpy().reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(fused_moving[0], 0.1 * batch.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(fused_moving[1], 0.9 + 0.1 * batch.var(axis=0), rtol=1e-5)
    for expected, actual in zip(reference_moving, fused_moving):
        np.testing.assert_allclose(actual, expected, rtol=1e-5)


def test_inference_and_unsupported_inputs_use_keras_computation():
    rng = np.random.default_rng(1)
    features = tf.constant(rng.normal(size=(8, 3)).astype(np.float32))  # 2-D: not the fused kernel's layout
    reference, fused = _pair(features.shape)
    np.testing.assert_allclose(fused(features, training=True), reference(features, training=True), atol=1e-6)
    images = tf.constant(rng.normal(size=(2, 3, 3, 3)).astype(np.float32))
    reference, fused = _pair(images.shape)
    np.testing.assert_allclose(fused(images, training=False), reference(images, training=False), atol=1e-6)
    assert keras.layers.deserialize(keras.layers.serialize(fused)).__class__ is FusedBatchNormalization
