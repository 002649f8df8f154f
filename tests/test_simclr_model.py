"""SimCLR model: train_step behaviour, the online probe, evaluation and saving."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from config_round_trip import assert_config_round_trip

from simclr_keras import LARS, ProjectionHead, SimCLR, SimCLRAugmentation

IMAGE_SIZE = 16


def tiny_encoder():
    images = keras.Input((None, None, 3))
    features = keras.layers.Conv2D(32, 3, padding="same", use_bias=False)(images)
    features = keras.layers.BatchNormalization()(features)
    features = keras.layers.ReLU()(features)
    return keras.Model(images, keras.layers.GlobalAveragePooling2D()(features), name="encoder")


def tiny_simclr(num_classes=3, freeze_encoder=False, seed=1):
    keras.utils.set_random_seed(seed)
    model = SimCLR(
        encoder=tiny_encoder(),
        projection_head=ProjectionHead(num_layers=2, output_dim=32),
        augmenter=SimCLRAugmentation(IMAGE_SIZE, color_jitter_strength=0.5, seed=seed),
        temperature=0.5,
        num_classes=num_classes,
        freeze_encoder=freeze_encoder,
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    return model


def batch(n=8, labels=True, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    return (images, rng.integers(0, 3, n)) if labels else images


def weights_of(layer):
    return [w.numpy().copy() for w in layer.weights]


def test_one_step_trains_everything_and_logs_the_steps_values():
    model = tiny_simclr()
    encoder_before, head_before = weights_of(model.encoder), weights_of(model.projection_head)
    history = model.fit(*batch(), batch_size=8, epochs=1, verbose=0)
    logs = {name: values[-1] for name, values in history.history.items()}
    assert set(logs) == {"loss", "contrastive_accuracy", "probe_loss", "probe_accuracy", "learning_rate"}
    assert math.isfinite(logs["loss"]) and logs["loss"] > 0
    assert logs["learning_rate"] == pytest.approx(0.1)
    assert any(not np.allclose(a, b) for a, b in zip(encoder_before, weights_of(model.encoder)))
    assert any(not np.allclose(a, b) for a, b in zip(head_before, weights_of(model.projection_head)))
    assert int(model.optimizer.iterations) == 1


def test_probe_gradients_never_reach_the_encoder():
    images, labels = batch()
    with_labels, without_labels = tiny_simclr(seed=3), tiny_simclr(seed=3)
    kernel_before = with_labels.probe.classifier.kernel.numpy().copy()
    with_labels.fit(images, labels, batch_size=8, epochs=1, verbose=0, shuffle=False)
    without_labels.fit(images, batch_size=8, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(weights_of(with_labels.encoder), weights_of(without_labels.encoder)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert not np.allclose(kernel_before, with_labels.probe.classifier.kernel.numpy())
    np.testing.assert_allclose(kernel_before, without_labels.probe.classifier.kernel.numpy())


def test_unlabelled_examples_do_not_train_the_probe():
    images, _ = batch()
    model = tiny_simclr()
    probe_before = [w.numpy().copy() for w in model.probe.trainable_weights]
    model.fit(images, np.full(8, -1), batch_size=8, epochs=1, verbose=0)
    for a, b in zip(probe_before, model.probe.trainable_weights):
        np.testing.assert_allclose(a, b.numpy())


def test_freeze_encoder_trains_only_the_probe():
    model = tiny_simclr(freeze_encoder=True)
    trainable_before = [w.numpy().copy() for w in model.encoder.trainable_weights]
    probe_before = model.probe.classifier.kernel.numpy().copy()
    model.fit(*batch(), batch_size=8, epochs=1, verbose=0)
    for a, b in zip(trainable_before, model.encoder.trainable_weights):
        np.testing.assert_array_equal(a, b.numpy())
    assert not np.allclose(probe_before, model.probe.classifier.kernel.numpy())


def test_evaluate_reports_the_probes_accuracy_on_unaugmented_images():
    model = tiny_simclr()
    model.fit(*batch(16), batch_size=8, epochs=2, verbose=0)
    images, labels = batch(10, seed=5)
    # Independent computation: encode the resized, scaled images in inference mode, then the probe.
    scaled = tf.image.resize(images.astype(np.float32) / 255.0, (IMAGE_SIZE, IMAGE_SIZE))
    logits = model.probe(model.encoder(scaled, training=False)).numpy()
    expected = float(np.mean(np.argmax(logits, axis=-1) == labels))
    results = model.evaluate(images, labels, batch_size=4, return_dict=True, verbose=0)
    assert results["probe_accuracy"] == pytest.approx(expected)


def test_config_round_trip_and_keras_file_save_load(tmp_path):
    model = tiny_simclr()
    model.fit(*batch(), batch_size=8, epochs=1, verbose=0)
    clone = assert_config_round_trip(model, temperature=0.5, num_classes=3, freeze_encoder=False)
    assert (clone.temperature, clone.num_classes, clone.freeze_encoder) == (0.5, 3, False)
    assert clone.projection_head.output_dim == 32

    path = str(tmp_path / "simclr.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    images, labels = batch(4, seed=9)
    np.testing.assert_allclose(loaded(images), model(images), atol=1e-5)
    loaded.fit(images, labels, batch_size=4, epochs=1, verbose=0)  # and it keeps training


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        SimCLR(tiny_encoder(), ProjectionHead(), SimCLRAugmentation(IMAGE_SIZE), temperature=0)
    with pytest.raises(ValueError, match="freeze_encoder"):
        SimCLR(tiny_encoder(), ProjectionHead(), SimCLRAugmentation(IMAGE_SIZE), freeze_encoder=True)


def equation_1(z, temperature):
    """The paper's L for views [z; z] (both views of image i give z_i), as a plain loop over the 2N anchors."""
    views = np.concatenate([z, z]).astype(np.float64)
    views /= np.linalg.norm(views, axis=1, keepdims=True)
    count, losses, correct = len(views), [], []
    for anchor in range(count):
        positive = (anchor + count // 2) % count
        similarities = {k: views[anchor] @ views[k] / temperature for k in range(count) if k != anchor}
        losses.append(-similarities[positive] + math.log(sum(math.exp(value) for value in similarities.values())))
        correct.append(max(similarities, key=similarities.get) == positive)
    return float(np.mean(losses)), float(np.mean(correct))


def test_the_logged_loss_and_accuracy_are_equation_1s_for_the_steps_views():
    keras.utils.set_random_seed(2)
    nothing_random = dict(
        crop_area_range=(1.0, 1.0), aspect_ratio_range=(1.0, 1.0), flip_probability=0.0, color_jitter_probability=0.0,
        grayscale_probability=0.0,
    )  # fmt: skip
    model = SimCLR(
        encoder=tiny_encoder(),
        projection_head=ProjectionHead(num_layers=2, output_dim=32),
        augmenter=SimCLRAugmentation(IMAGE_SIZE, **nothing_random),  # both views of an image are the same
        temperature=0.5,
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    images = batch(8, labels=False)
    views = model.augmenter(images, training=True)
    # Before the step, in training mode (batch statistics of [v; v] are those of v).
    z = model.projection_head(model.encoder(views, training=True), training=True).numpy()
    expected_loss, expected_accuracy = equation_1(z, 0.5)
    history = model.fit(images, batch_size=8, epochs=1, verbose=0)
    assert history.history["loss"][0] == pytest.approx(expected_loss, rel=1e-5)
    assert history.history["contrastive_accuracy"][0] == expected_accuracy == 1.0  # each view's twin scores 1


@pytest.mark.parametrize("policy", [pytest.param("mixed_bfloat16", marks=pytest.mark.bfloat16), "mixed_float16"])
def test_mixed_precision_trains_with_float32_loss_and_weights(policy):
    keras.mixed_precision.set_dtype_policy(policy)
    try:
        model = tiny_simclr()
        history = model.fit(*batch(), batch_size=8, epochs=2, verbose=0)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert all(math.isfinite(value) for value in history.history["loss"])
    assert model.encoder.layers[1].compute_dtype == policy.split("_")[1]
    assert all(w.dtype == "float32" for w in model.trainable_weights)
    if policy == "mixed_float16":  # float16 gradients need loss scaling, which compile adds
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)


def official_objective(hidden, temperature):
    """google-research/simclr tf2/objective.py `add_contrastive_loss` (hidden_norm=True, one replica):
    loss_a + loss_b, each the mean softmax cross-entropy of one view's anchors."""
    large_num = 1e9
    hidden = tf.math.l2_normalize(hidden, -1)
    hidden1, hidden2 = tf.split(hidden, 2, 0)
    n = tf.shape(hidden1)[0]
    labels = tf.one_hot(tf.range(n), n * 2)
    masks = tf.one_hot(tf.range(n), n)
    logits_aa = tf.matmul(hidden1, hidden1, transpose_b=True) / temperature - masks * large_num
    logits_bb = tf.matmul(hidden2, hidden2, transpose_b=True) / temperature - masks * large_num
    logits_ab = tf.matmul(hidden1, hidden2, transpose_b=True) / temperature
    logits_ba = tf.matmul(hidden2, hidden1, transpose_b=True) / temperature
    loss_a = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(labels, tf.concat([logits_ab, logits_aa], 1)))
    loss_b = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(labels, tf.concat([logits_ba, logits_bb], 1)))
    return loss_a + loss_b


def official_lars_step(weight, gradient, learning_rate, weight_decay, eta, excluded):
    """One step of the official tf2/lars_optimizer.py from a zero momentum buffer, in float64 numpy:
    weight decay joins the gradient before the trust ratio; BatchNorm parameters and biases get neither."""
    weight, gradient = weight.astype(np.float64), gradient.astype(np.float64)
    if not excluded:
        gradient = gradient + weight_decay * weight
    trust_ratio = 1.0
    if not excluded:
        weight_norm, gradient_norm = np.linalg.norm(weight), np.linalg.norm(gradient)
        if weight_norm > 0 and gradient_norm > 0:
            trust_ratio = eta * weight_norm / gradient_norm
    velocity = learning_rate * trust_ratio * gradient  # momentum x 0 + scaled gradient
    return weight - velocity


def test_one_lars_step_is_the_official_update_of_the_official_objective():
    from fixed_views import AlternatingViews

    keras.utils.set_random_seed(3)
    model = SimCLR(
        encoder=tiny_encoder(),
        projection_head=ProjectionHead(num_layers=2, output_dim=16),
        augmenter=AlternatingViews(),
        temperature=0.5,
    )
    # A weight decay large enough that weight_decay * w is as large as the convolution's gradient:
    # then where it enters (before the trust ratio) and the objective's scale both change the step.
    learning_rate, weight_decay, eta = 0.5, 3.0, 0.001
    model.compile(optimizer=LARS(learning_rate, momentum=0.9, weight_decay=weight_decay, eta=eta))
    images = batch(8, labels=False)
    variables = model.trained_variables
    initial = [v.numpy().copy() for v in variables]

    # The official objective and its gradient on the same views and weights (batch statistics).
    view1, view2 = AlternatingViews.views(images)
    with tf.GradientTape() as tape:
        hidden = model.projection_head(model.encoder(tf.concat([view1, view2], 0), training=True), training=True)
        objective = official_objective(hidden, 0.5)
    gradients = tape.gradient(objective, variables)
    expected = [
        official_lars_step(w, g.numpy(), learning_rate, weight_decay, eta, excluded=len(w.shape) <= 1)
        for w, g in zip(initial, gradients)
    ]

    logs = model.train_on_batch(images, return_dict=True)
    # The log reports the paper's L, half the official objective.
    assert logs["loss"] == pytest.approx(float(objective) / 2, rel=1e-5)
    for variable, start, value in zip(variables, initial, expected):
        # The step itself, to float32 rounding of the two gradients (different reduction orders).
        expected_step = value - start
        np.testing.assert_allclose(
            variable.numpy() - start, expected_step, rtol=1e-3, atol=1e-3 * np.abs(expected_step).max(),
            err_msg=variable.path,
        )
