"""Tests for simclr_keras.optimizers against hand computations in numpy.

LARS: You et al., arXiv:1708.03888, as used by SimCLR (Chen et al.,
arXiv:2002.05709, Section 2.2 and Appendix B.1).
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from config_round_trip import assert_config_round_trip

from simclr_keras.optimizers import (
    LARS,
    AdamWithL2,
    SGDWithL2,
    WarmupConstant,
    WarmupCosineDecay,
    build_optimizer,
    build_schedule,
    scale_learning_rate,
)

LEARNING_RATE = 0.5
WEIGHT_DECAY = 0.01
ETA = 0.001
MOMENTUM = 0.9


def _variables(seed=0):
    """A kernel (rank 2), a bias and a BN gamma (rank 1) with random values."""
    generator = np.random.default_rng(seed)
    kernel = generator.normal(size=(3, 4)).astype("float32")
    bias = generator.normal(size=(4,)).astype("float32")
    gamma = generator.uniform(0.5, 1.5, size=(4,)).astype("float32")
    variables = [
        keras.Variable(kernel, name="kernel"),
        keras.Variable(bias, name="bias"),
        keras.Variable(gamma, name="gamma"),
    ]
    return variables, [kernel, bias, gamma]


def _gradients(seed=1):
    generator = np.random.default_rng(seed)
    return [
        generator.normal(size=(3, 4)).astype("float32"),
        generator.normal(size=(4,)).astype("float32"),
        generator.normal(size=(4,)).astype("float32"),
    ]


def _lars_kernel_step(weight, gradient):
    """Update of a decayed and adapted variable from zero momentum state."""
    decayed_gradient = gradient + WEIGHT_DECAY * weight
    trust_ratio = ETA * np.linalg.norm(weight) / np.linalg.norm(decayed_gradient)
    return LEARNING_RATE * trust_ratio * decayed_gradient


def _make_lars(**overrides):
    arguments = dict(
        learning_rate=LEARNING_RATE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, eta=ETA
    )
    arguments.update(overrides)
    return LARS(**arguments)


def test_lars_single_step_matches_hand_computation():
    variables, (kernel, bias, gamma) = _variables()
    gradients = _gradients()
    optimizer = _make_lars()
    optimizer.apply(gradients, variables)

    np.testing.assert_allclose(
        variables[0].numpy(), kernel - _lars_kernel_step(kernel, gradients[0]), rtol=1e-6
    )
    # Bias and BN gamma: plain SGD step, no decay, no trust ratio.
    np.testing.assert_allclose(variables[1].numpy(), bias - LEARNING_RATE * gradients[1], rtol=1e-6)
    np.testing.assert_allclose(variables[2].numpy(), gamma - LEARNING_RATE * gradients[2], rtol=1e-6)


def test_lars_two_steps_accumulate_momentum():
    variables, (kernel, bias, _) = _variables()
    first, second = _gradients(1), _gradients(2)
    optimizer = _make_lars()
    optimizer.apply(first, variables)
    optimizer.apply(second, variables)

    velocity = _lars_kernel_step(kernel, first[0])
    kernel_after_one = kernel - velocity
    velocity = MOMENTUM * velocity + _lars_kernel_step(kernel_after_one, second[0])
    np.testing.assert_allclose(variables[0].numpy(), kernel_after_one - velocity, rtol=1e-5)

    bias_velocity = LEARNING_RATE * first[1]
    bias_velocity = MOMENTUM * bias_velocity + LEARNING_RATE * second[1]
    expected_bias = bias - LEARNING_RATE * first[1] - bias_velocity
    np.testing.assert_allclose(variables[1].numpy(), expected_bias, rtol=1e-5)


def test_lars_nesterov_step():
    variables, (kernel, bias, _) = _variables()
    first, second = _gradients(1), _gradients(2)
    optimizer = _make_lars(nesterov=True, weight_decay=0.0)
    optimizer.apply(first, variables)
    optimizer.apply(second, variables)
    # Bias (no adaptation): v1 = lr g1, w1 = w0 - (m v1 + lr g1);
    # v2 = m v1 + lr g2, w2 = w1 - (m v2 + lr g2).
    velocity = LEARNING_RATE * first[1]
    bias_one = bias - (MOMENTUM * velocity + LEARNING_RATE * first[1])
    velocity = MOMENTUM * velocity + LEARNING_RATE * second[1]
    bias_two = bias_one - (MOMENTUM * velocity + LEARNING_RATE * second[1])
    np.testing.assert_allclose(variables[1].numpy(), bias_two, rtol=1e-5)


def test_lars_trust_ratio_is_one_for_zero_norms():
    zero_kernel = keras.Variable(np.zeros((2, 2), "float32"), name="kernel")
    kernel_values = np.arange(1.0, 5.0, dtype="float32").reshape(2, 2)
    kernel = keras.Variable(kernel_values, name="kernel")
    gradient = np.full((2, 2), 0.25, "float32")
    optimizer = _make_lars(weight_decay=0.0)
    optimizer.apply([gradient, np.zeros((2, 2), "float32")], [zero_kernel, kernel])
    # ||w|| = 0: trust ratio 1, plain learning-rate step.
    np.testing.assert_allclose(zero_kernel.numpy(), -LEARNING_RATE * gradient, rtol=1e-6)
    # ||g|| = 0: trust ratio 1 and nothing to apply.
    np.testing.assert_allclose(kernel.numpy(), kernel_values, rtol=1e-6)
    assert np.isfinite(kernel.numpy()).all()


def test_lars_weight_decay_is_not_applied_twice_or_decoupled():
    variables, (kernel, _, _) = _variables()
    optimizer = _make_lars(weight_decay=0.1, eta=1.0)
    zero_gradients = [np.zeros_like(v.numpy()) for v in variables]
    optimizer.apply(zero_gradients, variables)
    # g = wd * w, trust ratio = ||w|| / ||wd * w|| = 1 / wd: w - lr * w.
    np.testing.assert_allclose(variables[0].numpy(), kernel * (1 - LEARNING_RATE), rtol=1e-5)


def test_default_exclusions_on_a_dense_and_batch_norm_model():
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization()]
    )
    optimizer = _make_lars()
    decisions = {
        variable.path.split("/")[-1]: (
            optimizer.applies_weight_decay(variable),
            optimizer.applies_layer_adaptation(variable),
        )
        for variable in model.trainable_variables
    }
    assert decisions == {
        "kernel": (True, True),
        "bias": (False, False),
        "gamma": (False, False),
        "beta": (False, False),
    }


def test_pattern_exclusions_match_variable_paths():
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, name="encoder"), keras.layers.Dense(2, name="head")],
        name="model",
    )
    optimizer = _make_lars(exclude_from_weight_decay=["head"], exclude_from_layer_adaptation=[])
    decisions = {
        variable.path: (
            optimizer.applies_weight_decay(variable),
            optimizer.applies_layer_adaptation(variable),
        )
        for variable in model.trainable_variables
    }
    assert decisions == {
        "model/encoder/kernel": (True, True),
        "model/encoder/bias": (True, True),
        "model/head/kernel": (False, True),
        "model/head/bias": (False, True),
    }
    # Layer adaptation falls back to the weight-decay patterns when None.
    optimizer = _make_lars(exclude_from_weight_decay=["head"])
    head_kernel = model.get_layer("head").kernel
    assert not optimizer.applies_layer_adaptation(head_kernel)


def test_lars_honours_keras_exclude_from_weight_decay():
    variables, _ = _variables()
    optimizer = _make_lars()
    optimizer.exclude_from_weight_decay(var_list=[variables[0]])
    assert not optimizer.applies_weight_decay(variables[0])
    assert optimizer.applies_layer_adaptation(variables[0])


def test_lars_under_tf_function_matches_eager():
    eager_variables, _ = _variables()
    graph_variables, _ = _variables()
    gradients = _gradients()
    eager_optimizer = _make_lars()
    graph_optimizer = _make_lars()
    eager_optimizer.apply(gradients, eager_variables)
    graph_optimizer.build(graph_variables)

    @tf.function
    def apply_step(step_gradients):
        graph_optimizer.apply(step_gradients, graph_variables)

    apply_step([tf.constant(g) for g in gradients])
    for eager, graph in zip(eager_variables, graph_variables):
        np.testing.assert_allclose(graph.numpy(), eager.numpy(), rtol=1e-6)


def test_lars_inside_loss_scale_optimizer_matches_unscaled_step():
    plain_variables, _ = _variables()
    scaled_variables, _ = _variables()
    gradients = _gradients()
    _make_lars().apply(gradients, plain_variables)
    loss_scale_optimizer = keras.optimizers.LossScaleOptimizer(
        _make_lars(), initial_scale=1024.0
    )
    loss_scale_optimizer.apply([g * 1024.0 for g in gradients], scaled_variables)
    for plain, scaled in zip(plain_variables, scaled_variables):
        np.testing.assert_allclose(scaled.numpy(), plain.numpy(), rtol=1e-5)


def test_lars_with_schedule_in_model_fit_under_mixed_precision():
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)  # the initial weights decide how many float16 steps overflow
        model = keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(8), keras.layers.BatchNormalization(),
             keras.layers.Dense(1, dtype="float32")]
        )
        schedule = WarmupCosineDecay(base_learning_rate=0.1, total_steps=8, warmup_steps=1)
        model.compile(optimizer=_make_lars(learning_rate=schedule), loss="mse")
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        kernel_before = model.layers[0].kernel.numpy().copy()
        features = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
        targets = np.random.default_rng(1).normal(size=(16, 1)).astype("float32")
        # 8 steps: those whose float16 gradients overflow are skipped by the loss scaling (which then
        # halves the scale, from 2^15), and the warm-up's first rate is 0, so fewer steps change weights.
        history = model.fit(features, targets, batch_size=8, epochs=4, verbose=0)
        assert np.isfinite(history.history["loss"]).all()
        assert not np.allclose(model.layers[0].kernel.numpy(), kernel_before)
        assert 1 <= int(model.optimizer.iterations.numpy()) <= 8
    finally:
        keras.config.set_dtype_policy(previous_policy)


def test_lars_get_config_round_trip():
    schedule = WarmupCosineDecay(base_learning_rate=1.2, total_steps=100, warmup_steps=10)
    optimizer = _make_lars(
        learning_rate=schedule,
        nesterov=True,
        exclude_from_weight_decay=["batch_normalization", "bias"],
    )
    config = optimizer.get_config()
    assert config["weight_decay"] == WEIGHT_DECAY
    assert config["eta"] == ETA
    assert config["nesterov"] is True
    assert config["exclude_from_weight_decay"] == ["batch_normalization", "bias"]
    assert config["exclude_from_layer_adaptation"] is None
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(restored, LARS)
    assert restored.get_config() == config
    assert restored.get_config()["learning_rate"]["config"] == schedule.get_config()


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"momentum": 1.0}, "momentum=1.0"),
        ({"weight_decay": -1.0}, "weight_decay=-1.0"),
        ({"eta": 0.0}, "eta=0.0"),
        ({"exclude_from_weight_decay": "bias"}, "exclude_from_weight_decay='bias'"),
    ],
)
def test_lars_bad_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        _make_lars(**arguments)


def test_warmup_cosine_schedule_values():
    base, total, warmup = 2.0, 110, 10
    schedule = WarmupCosineDecay(base, total_steps=total, warmup_steps=warmup)

    def value(step):
        return float(schedule(step))

    assert value(0) == 0.0
    assert value(5) == pytest.approx(base * 5 / 10)
    assert value(10) == pytest.approx(base)
    # Half-way through the cosine part: cos(pi / 2) = 0.
    assert value(60) == pytest.approx(base * 0.5, rel=1e-5)
    assert value(35) == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * 25 / 100)), rel=1e-5)
    assert value(110) == pytest.approx(0.0, abs=1e-6)
    assert value(200) == pytest.approx(0.0, abs=1e-6)


def test_warmup_cosine_schedule_without_warmup_and_config():
    schedule = WarmupCosineDecay(1.0, total_steps=4, warmup_steps=0)
    assert float(schedule(0)) == pytest.approx(1.0)
    assert float(schedule(2)) == pytest.approx(0.5, rel=1e-5)
    config = WarmupCosineDecay(0.3, total_steps=1000, warmup_steps=100).get_config()
    assert config == {
        "base_learning_rate": 0.3,
        "total_steps": 1000,
        "warmup_steps": 100,
        "name": None,
    }
    assert_config_round_trip(WarmupCosineDecay(0.3, total_steps=1000, warmup_steps=100), **config)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"base_learning_rate": 1.0, "total_steps": 0}, "total_steps=0"),
        ({"base_learning_rate": 1.0, "total_steps": 10, "warmup_steps": 11}, "warmup_steps=11"),
        ({"base_learning_rate": -1.0, "total_steps": 10}, "base_learning_rate=-1.0"),
        ({"base_learning_rate": float("nan"), "total_steps": 10}, "base_learning_rate=nan"),
    ],
)
def test_warmup_cosine_schedule_bad_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        WarmupCosineDecay(**arguments)


def test_scale_learning_rate():
    assert scale_learning_rate(0.3, 4096, "linear") == pytest.approx(4.8)
    assert scale_learning_rate(0.3, 256, "linear") == pytest.approx(0.3)
    assert scale_learning_rate(0.075, 4096, "sqrt") == pytest.approx(4.8)
    assert scale_learning_rate(0.1, 100, "sqrt") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="scaling='cubic'"):
        scale_learning_rate(0.3, 256, "cubic")
    with pytest.raises(ValueError, match="batch_size=0"):
        scale_learning_rate(0.3, 0, "linear")


def _apply_to_kernel_and_bias(optimizer, gradient_value=0.0):
    kernel = keras.Variable(np.ones((2, 2), "float32"), name="kernel")
    bias = keras.Variable(np.ones((2,), "float32"), name="bias")
    gamma = keras.Variable(np.ones((2,), "float32"), name="gamma")
    optimizer.apply(
        [np.full((2, 2), gradient_value, "float32"), np.full((2,), gradient_value, "float32"),
         np.full((2,), gradient_value, "float32")],
        [kernel, bias, gamma],
    )
    return kernel.numpy(), bias.numpy(), gamma.numpy()


def test_build_optimizer_lars():
    optimizer = build_optimizer("lars", 0.1, weight_decay=1e-6, momentum=0.8)
    assert isinstance(optimizer, LARS)
    assert optimizer.weight_decay == 1e-6
    assert optimizer.momentum == 0.8


def test_build_optimizer_sgd_couples_weight_decay_and_excludes_bias_and_batch_norm():
    optimizer = build_optimizer("sgd", 0.1, weight_decay=0.5, momentum=0.9)
    assert isinstance(optimizer, SGDWithL2)
    assert isinstance(optimizer, keras.optimizers.SGD)
    assert optimizer.nesterov
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(restored, SGDWithL2) and restored.weight_decay == 0.5
    kernel, bias, gamma = _apply_to_kernel_and_bias(optimizer)
    # g = wd * w = 0.5; Keras Nesterov from zero velocity:
    # v = -lr g, w += m v - lr g = -(1 + m) lr g.
    np.testing.assert_allclose(kernel, 1.0 - (1 + 0.9) * 0.1 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(bias, 1.0)
    np.testing.assert_allclose(gamma, 1.0)


def torch_sgd_steps(weight, gradients, learning_rate, momentum, weight_decay, nesterov):
    """`torch.optim.SGD(momentum=..., weight_decay=..., nesterov=...)` by hand in float64."""
    weight, buffer = weight.astype(np.float64), None
    for gradient in gradients:
        gradient = gradient + weight_decay * weight
        buffer = gradient if buffer is None else momentum * buffer + gradient
        weight = weight - learning_rate * (gradient + momentum * buffer if nesterov else buffer)
    return weight


@pytest.mark.parametrize("nesterov", [False, True], ids=["plain", "nesterov"])
def test_build_optimizer_sgd_momentum_is_plain_or_nesterov_as_asked(nesterov):
    # MoCo trains with torch's plain momentum; the official SimCLR code with Nesterov's.
    optimizer = build_optimizer("sgd", 0.1, weight_decay=0.3, momentum=0.9, nesterov=nesterov)
    (kernel, bias, gamma), (kernel_value, _, _) = _variables(seed=7)
    gradients = [_gradients(seed=step) for step in (8, 9, 10)]
    for step_gradients in gradients:
        optimizer.apply(step_gradients, [kernel, bias, gamma])
    expected = torch_sgd_steps(kernel_value, [step[0] for step in gradients], 0.1, 0.9, 0.3, nesterov)
    np.testing.assert_allclose(kernel.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_build_optimizer_adamw_decoupled_weight_decay_excludes_bias_and_batch_norm():
    optimizer = build_optimizer("adamw", 0.1, weight_decay=0.5)
    assert isinstance(optimizer, keras.optimizers.AdamW)
    kernel, bias, gamma = _apply_to_kernel_and_bias(optimizer)
    # Zero gradient: the Adam step is 0, the decoupled decay is w * (1 - lr wd).
    np.testing.assert_allclose(kernel, 1.0 - 0.1 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(bias, 1.0)
    np.testing.assert_allclose(gamma, 1.0)


def torch_adam_steps(weight, gradients, learning_rate, weight_decay, beta_1=0.9, beta_2=0.999, epsilon=1e-8):
    """`torch.optim.Adam(weight_decay=...)` by hand in float64: L2 joins the gradient before both moments."""
    weight = weight.astype(np.float64)
    first, second = np.zeros_like(weight), np.zeros_like(weight)
    for step, gradient in enumerate(gradients, start=1):
        gradient = gradient + weight_decay * weight
        first = beta_1 * first + (1 - beta_1) * gradient
        second = beta_2 * second + (1 - beta_2) * gradient**2
        corrected_first, corrected_second = first / (1 - beta_1**step), second / (1 - beta_2**step)
        weight = weight - learning_rate * corrected_first / (np.sqrt(corrected_second) + epsilon)
    return weight


def test_build_optimizer_adam_is_torch_adam_with_coupled_l2_and_excludes_bias_and_batch_norm():
    optimizer = build_optimizer("adam", 1e-3, weight_decay=0.3)
    assert isinstance(optimizer, AdamWithL2) and not isinstance(optimizer, keras.optimizers.AdamW)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(restored, AdamWithL2) and restored.weight_decay == 0.3
    (kernel, bias, gamma), (kernel_value, bias_value, gamma_value) = _variables(seed=4)
    gradients = [_gradients(seed=5), _gradients(seed=6)]
    for step_gradients in gradients:
        optimizer.apply(step_gradients, [kernel, bias, gamma])
    steps = list(zip(*gradients))
    np.testing.assert_allclose(kernel.numpy(), torch_adam_steps(kernel_value, steps[0], 1e-3, 0.3), rtol=1e-5)
    # BatchNorm gammas and biases: Adam without the L2 term.
    np.testing.assert_allclose(bias.numpy(), torch_adam_steps(bias_value, steps[1], 1e-3, 0.0), rtol=1e-5)
    np.testing.assert_allclose(gamma.numpy(), torch_adam_steps(gamma_value, steps[2], 1e-3, 0.0), rtol=1e-5)


def test_constant_schedule_after_warmup():
    schedule = build_schedule("constant", 1e-3, total_steps=100, warmup_steps=10)
    assert isinstance(schedule, WarmupConstant)
    values = [float(schedule(step)) for step in (0, 5, 10, 50, 100, 1000)]
    np.testing.assert_allclose(values, [0.0, 5e-4, 1e-3, 1e-3, 1e-3, 1e-3], rtol=1e-6)
    assert float(build_schedule("constant", 1e-3, total_steps=100)(0)) == pytest.approx(1e-3)
    assert isinstance(build_schedule("cosine", 1e-3, total_steps=100), WarmupCosineDecay)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert isinstance(restored, WarmupConstant) and float(restored(50)) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match=r"name='step'.*'cosine', 'constant'"):
        build_schedule("step", 1e-3, total_steps=100)


def test_build_optimizer_unknown_name():
    with pytest.raises(ValueError, match=r"name='adagrad'.*'lars', 'sgd', 'adam', 'adamw'"):
        build_optimizer("adagrad", 0.1)
