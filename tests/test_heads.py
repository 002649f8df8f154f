"""Tests for simclr_keras.heads.ProjectionHead (SimCLR g(.), arXiv:2002.05709)."""

import keras
import numpy as np
import pytest
from config_round_trip import assert_config_round_trip

from simclr_keras.heads import ProjectionHead

EPSILON = 1e-5


def _parameter_counts(head):
    trainable = sum(int(np.prod(v.shape)) for v in head.trainable_weights)
    non_trainable = sum(int(np.prod(v.shape)) for v in head.non_trainable_weights)
    return trainable, non_trainable


def _randomise_batch_norm_statistics(head, seed=0):
    generator = np.random.default_rng(seed)
    for batch_norm in head.batch_norm_layers:
        units = batch_norm.moving_mean.shape[0]
        batch_norm.moving_mean.assign(generator.normal(size=units).astype("float32"))
        batch_norm.moving_variance.assign(generator.uniform(0.5, 2.0, size=units).astype("float32"))
        batch_norm.gamma.assign(generator.uniform(0.5, 1.5, size=units).astype("float32"))
        if batch_norm.center:
            batch_norm.beta.assign(generator.normal(size=units).astype("float32"))


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_output_shape_and_dtype(num_layers):
    head = ProjectionHead(num_layers=num_layers, output_dim=8)
    outputs = head(np.random.normal(size=(4, 16)).astype("float32"), training=True)
    assert tuple(outputs.shape) == (4, 8)
    assert outputs.dtype == "float32"
    assert head.compute_output_shape((None, 16)) == (None, 8)


def test_parameter_count_two_layers_default_hidden_width():
    input_dim, output_dim = 16, 8
    head = ProjectionHead(num_layers=2, output_dim=output_dim)
    head.build((None, input_dim))
    # Dense kernels (no bias); hidden BN has gamma+beta, output BN gamma only.
    expected_trainable = (
        input_dim * input_dim + 2 * input_dim + input_dim * output_dim + output_dim
    )
    expected_moving = 2 * input_dim + 2 * output_dim
    assert _parameter_counts(head) == (expected_trainable, expected_moving)


def test_parameter_count_three_layers_explicit_hidden_width():
    input_dim, hidden_dim, output_dim = 12, 20, 6
    head = ProjectionHead(num_layers=3, hidden_dim=hidden_dim, output_dim=output_dim)
    head.build((None, input_dim))
    expected_trainable = (
        input_dim * hidden_dim + 2 * hidden_dim
        + hidden_dim * hidden_dim + 2 * hidden_dim
        + hidden_dim * output_dim + output_dim
    )
    expected_moving = 2 * hidden_dim * 2 + 2 * output_dim
    assert _parameter_counts(head) == (expected_trainable, expected_moving)


def test_layer_settings():
    head = ProjectionHead(num_layers=3, output_dim=8)
    head.build((None, 16))
    assert [dense.units for dense in head.dense_layers] == [16, 16, 8]
    assert not any(dense.use_bias for dense in head.dense_layers)
    assert [bn.center for bn in head.batch_norm_layers] == [True, True, False]
    for batch_norm in head.batch_norm_layers:
        assert batch_norm.momentum == pytest.approx(0.9)
        assert batch_norm.epsilon == pytest.approx(EPSILON)


def test_inference_matches_numpy_with_relu_on_hidden_layers_only():
    head = ProjectionHead(num_layers=3, hidden_dim=10, output_dim=5)
    inputs = np.random.default_rng(1).normal(size=(6, 7)).astype("float32")
    head.build(inputs.shape)
    _randomise_batch_norm_statistics(head)

    expected = inputs.astype("float64")
    for layer_index, (dense, bn) in enumerate(zip(head.dense_layers, head.batch_norm_layers)):
        expected = expected @ dense.kernel.numpy()
        expected = (expected - bn.moving_mean.numpy()) / np.sqrt(bn.moving_variance.numpy() + EPSILON)
        expected = expected * bn.gamma.numpy()
        if bn.center:
            expected = expected + bn.beta.numpy()
        if layer_index < 2:
            expected = np.maximum(expected, 0.0)

    outputs = keras.ops.convert_to_numpy(head(inputs, training=False))
    np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-5)
    # No ReLU after the last layer.
    assert (outputs < 0).any()


def test_training_uses_batch_statistics_and_updates_moving_averages():
    head = ProjectionHead(num_layers=2, output_dim=4)
    generator = np.random.default_rng(2)
    inputs = generator.normal(loc=3.0, size=(32, 8)).astype("float32")
    head.build(inputs.shape)
    # Unit-scale kernels so the BN epsilon is negligible against the batch
    # variance (the default 0.01-stddev init makes it ~2% of it).
    for dense in head.dense_layers:
        dense.kernel.assign(generator.normal(size=dense.kernel.shape).astype("float32"))
    training_outputs = keras.ops.convert_to_numpy(head(inputs, training=True))
    # The last BN has gamma = 1 and no beta: batch mean 0, batch variance ~1.
    np.testing.assert_allclose(training_outputs.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(training_outputs.var(axis=0), 1.0, rtol=1e-2)
    # Moving averages moved by (1 - momentum) towards the batch statistics.
    last_bn = head.batch_norm_layers[-1]
    assert not np.allclose(last_bn.moving_variance.numpy(), 1.0)

    head_for_inference = ProjectionHead(num_layers=2, output_dim=4)
    head_for_inference.build(inputs.shape)
    head_for_inference.set_weights(head.get_weights())
    inference_outputs = keras.ops.convert_to_numpy(head_for_inference(inputs, training=False))
    assert not np.allclose(inference_outputs, training_outputs, atol=1e-2)


def test_get_config_round_trip():
    head = ProjectionHead(num_layers=3, hidden_dim=32, output_dim=64, name="g")
    assert_config_round_trip(head, num_layers=3, hidden_dim=32, output_dim=64, synchronized_batch_norm=False, name="g")


def test_saved_model_round_trip(tmp_path):
    inputs = keras.Input(shape=(12,))
    model = keras.Model(inputs, ProjectionHead(output_dim=4, name="head")(inputs))
    features = np.random.default_rng(3).normal(size=(3, 12)).astype("float32")
    path = str(tmp_path / "head.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored.get_layer("head"), ProjectionHead)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(restored(features)),
        keras.ops.convert_to_numpy(model(features)),
        rtol=1e-6,
    )


@pytest.mark.bfloat16
def test_mixed_precision_output_is_float32():
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        head = ProjectionHead(output_dim=4)
        outputs = head(np.ones((2, 8), "float32"), training=True)
        assert head.dense_layers[0].compute_dtype == "bfloat16"
        assert outputs.dtype == "float32"
    finally:
        keras.config.set_dtype_policy(previous_policy)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"num_layers": -1}, "num_layers=-1"),
        ({"output_dim": 0}, "output_dim=0"),
        ({"output_dim": -3}, "output_dim=-3"),
        ({"hidden_dim": 0}, "hidden_dim=0"),
    ],
)
def test_bad_arguments_raise_value_error(arguments, message):
    with pytest.raises(ValueError, match=message):
        ProjectionHead(**arguments)


def test_linear_probe_is_affine_in_h_at_inference_and_standardises_in_training():
    from simclr_keras.heads import LinearProbe

    rng = np.random.default_rng(0)
    probe = LinearProbe(3)
    probe.build((None, 5))
    mean, variance = rng.normal(size=5), rng.uniform(0.5, 2.0, size=5)
    probe.normalization.moving_mean.assign(mean)
    probe.normalization.moving_variance.assign(variance)
    h = rng.normal(size=(4, 5)).astype(np.float32) * 3 + 1
    kernel, bias = probe.classifier.kernel.numpy(), probe.classifier.bias.numpy()
    expected = ((h - mean) / np.sqrt(variance + 1e-5)) @ kernel + bias
    np.testing.assert_allclose(probe(h, training=False), expected, rtol=1e-4, atol=1e-5)
    standardised = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5)
    np.testing.assert_allclose(probe(h, training=True), standardised @ kernel + bias, rtol=1e-4, atol=1e-4)
    assert [w.name for w in probe.trainable_weights] == ["kernel", "bias"]
    with pytest.raises(ValueError, match="num_classes=1"):
        LinearProbe(1)


def test_checkpoint_round_trip_restores_every_head_variable(tmp_path):
    import tensorflow as tf

    head = ProjectionHead(num_layers=3, output_dim=4)
    head.build((None, 6))
    for variable in head.weights:
        variable.assign(np.random.default_rng(0).normal(size=variable.shape))
    path = tf.train.Checkpoint(head=head).save(str(tmp_path / "ckpt"))
    restored = ProjectionHead(num_layers=3, output_dim=4)
    restored.build((None, 6))
    tf.train.Checkpoint(head=restored).restore(path).assert_consumed()
    for original, loaded in zip(head.weights, restored.weights):
        np.testing.assert_array_equal(original.numpy(), loaded.numpy())


def test_hidden_batch_norm_head_is_the_debiased_and_hcl_reference_head():
    # Reference (chingyaoc/DCL and joshr17/HCL model.py): Linear(2048, 512, bias=False), BatchNorm1d,
    # ReLU, Linear(512, 128, bias=True). Here 12 -> 6 -> 4, in training mode (batch statistics).
    head = ProjectionHead(num_layers=2, hidden_dim=6, output_dim=4, batch_norm="hidden")
    inputs = np.random.default_rng(3).normal(size=(10, 12)).astype("float32")
    head.build(inputs.shape)
    first, second = head.dense_layers
    assert (first.use_bias, second.use_bias) == (False, True)
    assert head.batch_norm_layers[1] is None and head.batch_norm_layers[0].center
    hidden = inputs.astype("float64") @ first.kernel.numpy()
    hidden = (hidden - hidden.mean(axis=0)) / np.sqrt(hidden.var(axis=0) + EPSILON)  # gamma 1, beta 0
    expected = np.maximum(hidden, 0.0) @ second.kernel.numpy() + second.bias.numpy()
    outputs = keras.ops.convert_to_numpy(head(inputs, training=True))
    np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-5)
    clone = assert_config_round_trip(head, batch_norm="hidden", hidden_dim=6, output_dim=4)
    assert clone.batch_norm == "hidden"


def test_heads_without_full_batch_norm_start_as_pytorch_linear_layers():
    head = ProjectionHead(num_layers=2, hidden_dim=400, output_dim=300, batch_norm="none")
    head.build((None, 100))
    for dense, fan_in in zip(head.dense_layers, (100, 400)):
        bound = 1.0 / np.sqrt(fan_in)  # torch.nn.Linear: kernel and bias uniform in +-1/sqrt(fan_in)
        for values in (dense.kernel.numpy(), dense.bias.numpy()):
            assert np.abs(values).max() <= bound
            assert np.abs(values).max() > 0.95 * bound
            assert values.std() == pytest.approx(bound / np.sqrt(3.0), rel=0.1)
    with pytest.raises(ValueError, match=r"batch_norm='output'"):
        ProjectionHead(batch_norm="output")
