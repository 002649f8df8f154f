"""Micro-batched SimCLR steps (gradient caching): the same step as the plain one, in less memory.

References: the plain one-pass step where BatchNorm cannot tell the difference; with BatchNorm, the
same micro-batches encoded separately under one tape (full autodiff, no caching), and the momentum
update of the moving statistics computed by hand.
"""

import json
import math
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from config_round_trip import assert_config_round_trip

from simclr_keras import ProjectionHead, SimCLR, SimCLRAugmentation
from simclr_keras.models.moco import MoCo
from strategies import mirrored

IMAGE_SIZE = 8
BATCH_SIZE = 16


@keras.saving.register_keras_serializable(package="test_gradient_cache")
class ScaleOnly(keras.layers.Layer):
    """Fixed views (augmentation off): both views are the scaled images."""

    def call(self, images, training=True):
        return tf.cast(images, self.compute_dtype) / 255.0


def encoder_without_batch_norm():
    images = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    features = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(images)
    features = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(features)
    return keras.Model(images, keras.layers.GlobalAveragePooling2D()(features), name="encoder")


def encoder_with_batch_norm(input_momentum=0.99, synchronized=False):
    """Conv-BN-ReLU, with a first BatchNorm on the views themselves (its inputs are known to the test)."""
    images = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    features = keras.layers.BatchNormalization(
        momentum=input_momentum, synchronized=synchronized, name="input_batch_norm"
    )(images)
    features = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(features)
    features = keras.layers.ReLU()(keras.layers.BatchNormalization(synchronized=synchronized)(features))
    return keras.Model(images, keras.layers.GlobalAveragePooling2D()(features), name="encoder")


def make_model(
    micro_batch_size=None, batch_norm=False, loss="nt_xent", num_classes=3, augmenter=None, learning_rate=0.5,
    input_momentum=0.99, synchronized_batch_norm=False,
):
    keras.utils.set_random_seed(4)  # the same initial weights for every model of a test
    model = SimCLR(
        encoder=(
            encoder_with_batch_norm(input_momentum, synchronized_batch_norm)
            if batch_norm
            else encoder_without_batch_norm()
        ),
        # A Dense head has no BatchNorm either; ProjectionHead (with BatchNorm) goes with the BN encoder.
        projection_head=(
            ProjectionHead(num_layers=2, output_dim=6, synchronized_batch_norm=synchronized_batch_norm)
            if batch_norm
            else keras.layers.Dense(6)
        ),
        augmenter=augmenter or ScaleOnly(),
        temperature=0.5,
        num_classes=num_classes,
        loss=loss,
        micro_batch_size=micro_batch_size,
        synchronized_batch_norm=synchronized_batch_norm,  # the probe's BatchNorm (and the others', if any)
    )
    model.compile(optimizer=keras.optimizers.SGD(learning_rate))
    return model


def batch(n=BATCH_SIZE, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8), rng.integers(0, 3, n)


def one_step(model, images, labels=None):
    dataset = tf.data.Dataset.from_tensor_slices(images if labels is None else (images, labels))
    # drop_remainder: the batch size is known while tracing, as in simclr_keras.train.
    history = model.fit(dataset.batch(len(images), drop_remainder=True), epochs=1, verbose=0)
    return {name: values[-1] for name, values in history.history.items()}


def largest_difference(first, second):
    return max(float(np.max(np.abs(a - b))) for a, b in zip(first, second))


def assert_step_moved_the_weights(initial, trained):
    # Otherwise two copies of the initial weights would compare equal.
    assert largest_difference(initial, trained) > 1e-2


@pytest.mark.parametrize("loss", ["nt_xent", "hard_negative"])
def test_without_batch_norm_micro_batches_of_n_over_8_give_the_plain_steps_weights(loss):
    images, labels = batch()
    plain, micro = make_model(loss=loss), make_model(BATCH_SIZE // 8, loss=loss)
    initial = plain.get_weights()
    plain_logs, micro_logs = one_step(plain, images, labels), one_step(micro, images, labels)
    for name in ("loss", "contrastive_accuracy", "probe_loss", "probe_accuracy"):
        assert micro_logs[name] == pytest.approx(plain_logs[name], abs=1e-6), name
    # Encoder, head and the online probe (with its BatchNorm on the whole batch's h) alike.
    assert largest_difference(plain.get_weights(), micro.get_weights()) < 2e-6
    assert_step_moved_the_weights(initial, plain.get_weights())


@pytest.mark.slow
def test_views_are_drawn_once_per_step_and_reused_by_both_passes():
    # With random views and no BatchNorm, the micro-batched step equals the plain one only if both
    # passes encode the views the plain step would have drawn (one draw per step, same random state).
    images, labels = batch()
    plain, micro = (
        make_model(micro_batch_size, augmenter=SimCLRAugmentation(IMAGE_SIZE, seed=5)) for micro_batch_size in (None, 4)
    )
    for _ in range(2):  # the second step checks that the random state advanced alike
        one_step(plain, images, labels), one_step(micro, images, labels)
    assert largest_difference(plain.get_weights(), micro.get_weights()) < 2e-6
    np.testing.assert_array_equal(
        plain.augmenter.seed_generator.state.numpy(), micro.augmenter.seed_generator.state.numpy()
    )




@pytest.mark.parametrize("loss", ["nt_xent", "hard_negative"])
def test_two_replicas_micro_batching_their_halves_equal_one_plain_device(loss):
    images, labels = batch()
    single = make_model(loss=loss)
    with mirrored().scope():  # 8 images per replica, 4 micro-batches each; the probe sees the global h
        replicated = make_model(BATCH_SIZE // 8, loss=loss, synchronized_batch_norm=True)
    single_logs, replicated_logs = one_step(single, images, labels), one_step(replicated, images, labels)
    for name in ("loss", "contrastive_accuracy", "probe_loss", "probe_accuracy"):
        assert replicated_logs[name] == pytest.approx(single_logs[name], abs=1e-5), name
    # Negatives from the other replica, and gradients summed over both, or this would not hold.
    assert largest_difference(single.get_weights(), replicated.get_weights()) < 2e-6


@pytest.mark.slow
def test_two_replicas_with_synchronized_batch_norm_equal_one_device_on_the_union_of_their_micro_batches():
    # Synchronized BatchNorm normalises micro-batch k with the statistics of every replica's k-th
    # micro-batch: one device whose k-th micro-batch is their union takes the same step.
    images, labels = batch()
    micro_batch_size, per_replica = 2, BATCH_SIZE // 2
    # momentum 0.5 on the first BatchNorm: its moving statistics show the micro-batches' order.
    settings = dict(batch_norm=True, learning_rate=0.02, input_momentum=0.5)
    with mirrored().scope():
        replicated = make_model(micro_batch_size, synchronized_batch_norm=True, **settings)
    initial = replicated.get_weights()
    one_step(replicated, images, labels)
    union = np.concatenate(
        [
            np.r_[start : start + micro_batch_size, per_replica + start : per_replica + start + micro_batch_size]
            for start in range(0, per_replica, micro_batch_size)
        ]
    )  # replica 0's rows of micro-batch k, then replica 1's
    single = make_model(2 * micro_batch_size, **settings)
    one_step(single, images[union], labels[union])
    # Each weight to float32 round-off of its own update (the head's kernels move by ~0.2 here, the
    # moving statistics by ~1e-3), the moving statistics included.
    for expected, actual, before in zip(single.get_weights(), replicated.get_weights(), initial):
        assert np.max(np.abs(expected - actual)) <= 1e-6 + 1e-4 * np.max(np.abs(expected - before))
    assert_step_moved_the_weights(initial, single.get_weights())


def separately_encoded_reference_step(model, images, micro_batch_size, learning_rate):
    """One SGD step where each micro-batch is encoded on its own, all under one tape (no caching).

    Returns the weights after the step, in `model.get_weights()` order.
    """
    views = images.astype(np.float32) / 255.0  # ScaleOnly's views
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        z1, z2 = [], []
        for start in range(0, len(views), micro_batch_size):
            micro = views[start : start + micro_batch_size]
            z = model.projection_head(model.encoder(np.concatenate([micro, micro]), training=True), training=True)
            z1.append(z[:micro_batch_size])
            z2.append(z[micro_batch_size:])
        loss, _ = model.contrastive_loss(tf.concat(z1, 0), tf.concat(z2, 0))
        # What the model optimises (objective_scale x the loss; no probe here): under test is how z is reached.
        objective = model._objective(loss, None, None)
    for variable, gradient in zip(variables, tape.gradient(objective, variables)):
        variable.assign_sub(learning_rate * gradient)
    return model.get_weights()


@pytest.mark.parametrize("micro_batch_size", [2, 8])
def test_with_batch_norm_one_step_equals_encoding_the_micro_batches_separately(micro_batch_size):
    images, _ = batch()
    # A small learning rate: the head's kernels (initial scale 0.01, each followed by BatchNorm) get
    # gradients of ~10, and float32 round-off (eager reference, graph step) scales with them.
    micro = make_model(micro_batch_size, batch_norm=True, num_classes=None, learning_rate=0.02)
    initial = micro.get_weights()
    one_step(micro, images)
    reference = make_model(batch_norm=True, num_classes=None)
    expected = separately_encoded_reference_step(reference, images, micro_batch_size, learning_rate=0.02)
    # Every weight, the BatchNorm moving statistics included.
    assert largest_difference(expected, micro.get_weights()) < 2e-6
    assert_step_moved_the_weights(initial, expected)


def test_moving_statistics_are_updated_once_per_micro_batch():
    images, _ = batch()
    momentum, micro_batch_size = 0.5, 4
    model = make_model(micro_batch_size, batch_norm=True, num_classes=None, input_momentum=momentum)
    one_step(model, images)
    # By hand: the first BatchNorm sees the views of each micro-batch (both views equal here), in order.
    mean, variance = np.zeros(3), np.ones(3)  # Keras' initial moving statistics
    for start in range(0, BATCH_SIZE, micro_batch_size):
        views = images[start : start + micro_batch_size].astype(np.float64) / 255.0
        mean = momentum * mean + (1 - momentum) * views.mean(axis=(0, 1, 2))
        variance = momentum * variance + (1 - momentum) * views.var(axis=(0, 1, 2))  # biased, as Keras
    layer = model.encoder.get_layer("input_batch_norm")
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), variance, atol=1e-6)


def test_mixed_float16_scales_the_loss_and_matches_the_plain_step():
    images, labels = batch()
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        plain, micro = make_model(), make_model(BATCH_SIZE // 8)
        initial = plain.get_weights()
        one_step(plain, images, labels), one_step(micro, images, labels)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert isinstance(micro.optimizer, keras.optimizers.LossScaleOptimizer)
    assert micro.encoder.layers[1].compute_dtype == "float16"
    update = largest_difference(initial, plain.get_weights())
    # float16 activations round differently in 2-view and 16-view passes; a missing or doubled loss
    # scale would change the update by a factor of 2**15.
    assert largest_difference(plain.get_weights(), micro.get_weights()) < 0.01 * update


@pytest.mark.parametrize("value", [0, -4, 2.5, True])
def test_a_micro_batch_size_below_one_or_not_an_integer_is_refused(value):
    with pytest.raises(ValueError, match=rf"micro_batch_size must be an integer >= 1 .*got {value!r}\."):
        make_model(value)


def test_a_micro_batch_size_that_does_not_divide_the_batch_is_refused():
    model = make_model(3)
    with pytest.raises(ValueError, match="micro_batch_size=3 must divide the 16 images each replica trains on"):
        one_step(model, *batch())


def test_moco_refuses_a_micro_batch_size():
    components = dict(
        encoder=encoder_without_batch_norm(), projection_head=keras.layers.Dense(6), augmenter=ScaleOnly()
    )
    with pytest.raises(ValueError, match="micro_batch_size applies to SimCLR only, got micro_batch_size=4 for MoCo"):
        MoCo(**components, queue_size=32, micro_batch_size=4)


def test_a_last_smaller_batch_of_unknown_size_is_split_into_micro_batches_and_the_rest():
    # fit(x, batch_size=16) on 22 images: a batch of 16, then one of 6 (micro-batches of 4 and 2).
    images, labels = batch(22)
    plain, micro = make_model(), make_model(4)
    for model in (plain, micro):
        model.fit(images, labels, batch_size=BATCH_SIZE, epochs=1, shuffle=False, verbose=0)
    assert int(micro.optimizer.iterations) == 2
    assert largest_difference(plain.get_weights(), micro.get_weights()) < 2e-6


def test_micro_batch_size_survives_the_config_round_trip():
    clone = assert_config_round_trip(make_model(4), micro_batch_size=4)
    assert clone.micro_batch_size == 4


def train(*flags, env=None):
    command = [sys.executable, "-m", "simclr_keras.train", *flags]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# The --micro_batch_size flag errors are tested with the other training flag errors, in tests/test_train_cli.py.


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_workers_micro_batching_with_global_batch_norm_train_to_identical_weights(cifar10_500, tmp_path):
    # MultiWorkerMirroredStrategy, synchronized BatchNorm (the default with 2 replicas): the unrolled loop.
    cluster = {"worker": [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]}
    flags = [
        f"--dataset=folder:{cifar10_500}", f"--model_dir={tmp_path / 'run'}", "--strategy=multi_worker",
        "--train_steps=2", "--batch_size=64", "--micro_batch_size=8", "--width_multiplier=0.125", "--eval_split=",
    ]
    configs = [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}) for i in range(2)]
    workers = [train(*flags, env={**os.environ, "TF_CONFIG": config}) for config in configs]
    outputs = [worker.communicate(timeout=600) for worker in workers]
    for worker, (_, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr[-3000:]
    fingerprints = [
        next(line for line in stdout.splitlines() if "sum of squared weights" in line).split()[-1]
        for stdout, _ in outputs
    ]
    assert fingerprints[0] == fingerprints[1]
    with open(tmp_path / "run" / "train_log.jsonl", encoding="utf-8") as file:
        records = [json.loads(line) for line in file]
    assert [record["step"] for record in records] == [1, 2]
    assert all(math.isfinite(record["loss"]) for record in records)
