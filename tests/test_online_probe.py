"""The online probe is trained as the official SimCLR code trains its supervised head during pretraining.

The reference is the official tf2 code (google-research/simclr, commit 383d414), written out by hand
in numpy below: `model.py` puts the head on tf.stop_gradient(h) of both views, `run.py` takes the
mean cross-entropy over them (`tf.concat([labels, labels], 0)`), `add_weight_decay` adds
weight_decay * l2_loss(kernel) of the head to the loss (the bias is not decayed), and its LARS
excludes 'head_supervised' from the trust ratio: plain classic momentum, v = m v + lr g, w -= v.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from fixed_views import AlternatingViews

from simclr_keras import LARS, ProjectionHead, SimCLR, SimCLRAugmentation, build_optimizer
from simclr_keras.models.moco import MoCo
from simclr_keras.optimizers import WarmupCosineDecay

IMAGE_SIZE = 8
BATCH_SIZE = 8
NUM_CLASSES = 3
WEIGHT_DECAY = 0.05  # large, so that a missing decay term shows
MOMENTUM = 0.9
TOTAL_STEPS = 4


def tiny_encoder():
    # No BatchNorm: micro-batches then give the plain step's h exactly.
    images = keras.Input((None, None, 3))
    features = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(images)
    return keras.Model(images, keras.layers.GlobalAveragePooling2D()(features), name="encoder")


def schedule():
    return WarmupCosineDecay(1.0, TOTAL_STEPS)


def scheduled_rate(step):
    return 0.5 * (1 + math.cos(math.pi * step / TOTAL_STEPS))  # the official cosine decay, no warm-up


OPTIMIZERS = {
    "build_optimizer": lambda: build_optimizer("lars", schedule(), WEIGHT_DECAY, MOMENTUM),
    "build_optimizer_readme": lambda: build_optimizer(
        "lars", schedule(), WEIGHT_DECAY, MOMENTUM, exclude_layers=["linear_probe"]
    ),
    "LARS": lambda: LARS(schedule(), momentum=MOMENTUM, weight_decay=WEIGHT_DECAY),
}


def tiny_simclr(optimizer, micro_batch_size=None, augmenter=None):
    keras.utils.set_random_seed(7)
    model = SimCLR(
        encoder=tiny_encoder(),
        projection_head=keras.layers.Dense(6),
        augmenter=augmenter or AlternatingViews(),
        temperature=0.5,
        num_classes=NUM_CLASSES,
        micro_batch_size=micro_batch_size,
    )
    model.compile(optimizer=optimizer)
    return model


def batch(seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (BATCH_SIZE, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    return images, rng.integers(0, NUM_CLASSES, BATCH_SIZE)


def train_one_step(model, images, labels=None):
    data = (images,) if labels is None else (images, labels)
    model.fit(tf.data.Dataset.from_tensor_slices(data).batch(BATCH_SIZE), epochs=1, verbose=0)


def probe_inputs(model, images):
    """What the probe's linear layer reads, before the step: h of both views [2N, D], standardised over
    the 2N rows by the probe's parameter-free BatchNorm (the one difference from the official head)."""
    views = tf.concat(AlternatingViews.views(images), 0)
    representation = model.encoder(views, training=True).numpy().astype(np.float64)  # (2N, D)
    epsilon = model.probe.normalization.epsilon
    return (representation - representation.mean(0)) / np.sqrt(representation.var(0) + epsilon)


def mean_cross_entropy(logits, labels):
    log_probabilities = logits - np.log(np.exp(logits).sum(1, keepdims=True))  # (rows, C)
    return -log_probabilities[np.arange(len(labels)), labels].mean()


def official_head_step(features, labels, kernel, bias, velocities, learning_rate):
    """One step of the official supervised head: mean CE over both views, L2 on the kernel, plain momentum."""
    labels = np.concatenate([labels, labels])  # (2N,)
    logits = features @ kernel + bias  # (2N, C)
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    error = probabilities - np.eye(NUM_CLASSES)[labels]  # d CE / d logits, per view
    kernel_gradient = features.T @ error / len(labels) + WEIGHT_DECAY * kernel  # d (wd * ||W||^2 / 2) = wd W
    bias_gradient = error.mean(0)
    kernel_velocity = MOMENTUM * velocities[0] + learning_rate * kernel_gradient
    bias_velocity = MOMENTUM * velocities[1] + learning_rate * bias_gradient
    return kernel - kernel_velocity, bias - bias_velocity, (kernel_velocity, bias_velocity)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("micro_batch_size", [None, 2])
def test_probe_steps_are_the_official_supervised_heads(optimizer, micro_batch_size):
    model = tiny_simclr(OPTIMIZERS[optimizer](), micro_batch_size)
    kernel, bias = (w.numpy().astype(np.float64) for w in (model.probe.classifier.kernel, model.probe.classifier.bias))
    velocities = (np.zeros_like(kernel), np.zeros_like(bias))
    for step in range(2):  # the second step shows the momentum
        images, labels = batch(seed=step)
        features = probe_inputs(model, images)
        kernel, bias, velocities = official_head_step(features, labels, kernel, bias, velocities, scheduled_rate(step))
        train_one_step(model, images, labels)
        np.testing.assert_allclose(model.probe.classifier.kernel.numpy(), kernel, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(model.probe.classifier.bias.numpy(), bias, rtol=1e-4, atol=1e-6)


def test_the_probe_never_moves_the_encoder_under_lars():
    images, labels = batch()
    with_labels, without_labels = (tiny_simclr(OPTIMIZERS["build_optimizer"]()) for _ in range(2))
    train_one_step(with_labels, images, labels)
    train_one_step(without_labels, images)
    for a, b in zip(with_labels.encoder.weights, without_labels.encoder.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)


def test_logged_probe_loss_is_the_mean_over_both_views():
    model = tiny_simclr(OPTIMIZERS["LARS"]())
    images, labels = batch()
    features = probe_inputs(model, images)
    logits = features @ model.probe.classifier.kernel.numpy() + model.probe.classifier.bias.numpy()
    expected = mean_cross_entropy(logits, np.concatenate([labels, labels]))
    history = model.fit(images, labels, batch_size=BATCH_SIZE, epochs=1, verbose=0, shuffle=False)
    assert history.history["probe_loss"][-1] == pytest.approx(expected, rel=2e-5)


@pytest.mark.parametrize("symmetric, views", [(True, 2), (False, 1)])
def test_moco_probe_reads_every_query_view(symmetric, views):
    keras.utils.set_random_seed(7)
    model = MoCo(
        encoder=tiny_encoder(),
        projection_head=ProjectionHead(num_layers=2, output_dim=6, batch_norm="none"),
        augmenter=AlternatingViews(),
        num_classes=NUM_CLASSES,
        queue_size=16,
        symmetric=symmetric,
        batch_norm_splits=1,
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    images, labels = batch()
    # The query encoder's h of the views it encodes, before the step, and the probe on them.
    features = model.encoder(tf.concat(AlternatingViews.views(images)[:views], 0), training=True).numpy()
    expected = mean_cross_entropy(model.probe(features, training=True).numpy(), np.tile(labels, views))
    history = model.fit(images, labels, batch_size=BATCH_SIZE, epochs=1, verbose=0, shuffle=False)
    assert history.history["probe_loss"][-1] == pytest.approx(expected, rel=2e-5)


def test_lars_decays_the_probe_kernel_but_never_adapts_the_probe():
    for name, make_optimizer in OPTIMIZERS.items():
        model = tiny_simclr(make_optimizer())
        optimizer = model.optimizer
        for variable in model.trainable_variables:
            is_probe = "linear_probe" in variable.path
            is_kernel = variable.path.endswith("kernel")
            assert optimizer.applies_weight_decay(variable) == is_kernel, (name, variable.path)
            assert optimizer.applies_layer_adaptation(variable) == (is_kernel and not is_probe), (name, variable.path)


def test_lars_built_before_compile_says_so():
    model = tiny_simclr(OPTIMIZERS["LARS"]())
    optimizer = LARS(0.1)
    optimizer.build(model.trainable_variables)
    with pytest.raises(ValueError, match="before the optimizer is built"):
        model.compile(optimizer=optimizer)


def test_a_saved_model_loads_compiled_with_the_probe_kept_out_of_adaptation(tmp_path):
    model = tiny_simclr(OPTIMIZERS["LARS"](), augmenter=SimCLRAugmentation(IMAGE_SIZE, seed=1))
    train_one_step(model, *batch())
    path = str(tmp_path / "simclr.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    kernel = loaded.probe.classifier.kernel
    assert loaded.optimizer.applies_weight_decay(kernel)
    assert not loaded.optimizer.applies_layer_adaptation(kernel)
    assert loaded.optimizer.applies_layer_adaptation(loaded.encoder.trainable_weights[0])  # the convolution's kernel
