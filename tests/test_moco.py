"""MoCo v2: the queue, the momentum update, the InfoNCE loss, checkpoints, and the command line."""

import json
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from config_round_trip import assert_config_round_trip
from conftest import run_train_main

from simclr_keras.models.moco import build_moco, enqueue, moco_loss_with_accuracy

IMAGE_SIZE = 16


def tiny_moco(**overrides):
    keras.utils.set_random_seed(1)
    settings = dict(
        image_size=IMAGE_SIZE, width_multiplier=0.125, proj_dim=8, num_classes=3, moco_queue_size=40,
        moco_bn_splits=4, moco_momentum=0.9, seed=1,
    )
    model = build_moco(**{**settings, **overrides})
    model.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9))
    return model


def batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8), rng.integers(0, 3, n)


def test_enqueue_writes_in_order_and_wraps_around():
    queue = np.zeros((5, 2), np.float32)
    keys = np.arange(8, dtype=np.float32).reshape(4, 2) + 1  # rows [1,2], [3,4], [5,6], [7,8]
    new_queue, pointer = enqueue(tf.constant(queue), tf.constant(3, tf.int64), tf.constant(keys))
    expected = np.array([[5, 6], [7, 8], [0, 0], [1, 2], [3, 4]], np.float32)  # slots 3, 4, 0, 1
    np.testing.assert_array_equal(new_queue.numpy(), expected)
    assert int(pointer) == 2


def test_loss_matches_infonce_written_per_query():
    rng = np.random.default_rng(0)

    def unit(a):
        return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)

    queries, keys, queue = unit(rng.normal(size=(4, 3))), unit(rng.normal(size=(4, 3))), unit(rng.normal(size=(6, 3)))
    expected = 0.0
    for q, k in zip(queries, keys):
        positive = math.exp(q @ k / 0.2)
        expected += -math.log(positive / (positive + sum(math.exp(q @ n / 0.2) for n in queue)))
    loss, accuracy = moco_loss_with_accuracy(queries, keys, queue, 0.2)
    assert float(loss) == pytest.approx(expected / 4, rel=1e-5)
    wins = np.mean([(q @ k) > max(q @ n for n in queue) for q, k in zip(queries, keys)])
    assert float(accuracy) == pytest.approx(wins)


@pytest.mark.slow
def test_key_network_starts_equal_and_follows_by_momentum():
    model = tiny_moco()
    pairs = model._momentum_pairs()
    assert len(pairs) == len(model.encoder.trainable_weights) + len(model.projection_head.trainable_weights)
    for query, key in pairs:
        np.testing.assert_array_equal(query.numpy(), key.numpy())
    initial = [query.numpy().copy() for query, _ in pairs]
    model.fit(*batch(), batch_size=8, epochs=1, verbose=0)
    moved = 0
    for (query, key), start in zip(pairs, initial):
        # key <- m * key + (1 - m) * query, where key was the initial query weight.
        np.testing.assert_allclose(key.numpy(), 0.9 * start + 0.1 * query.numpy(), rtol=1e-5, atol=1e-6)
        moved += not np.allclose(query.numpy(), start)
    assert moved > 0
    # The key network takes no gradient steps: the optimizer never sees its variables.
    key_variables = {id(v) for v in model.key_encoder.weights + model.key_projection_head.weights}
    assert not key_variables & {id(v) for v in model.trained_variables}


@pytest.mark.slow
def test_queue_fills_with_normalised_keys_and_survives_a_checkpoint(tmp_path):
    model = tiny_moco()
    initial_queue = model.queue.numpy().copy()
    model.fit(*batch(), batch_size=8, epochs=1, verbose=0)  # one step: 16 keys (symmetric)
    queue = model.queue.numpy()
    assert int(model.queue_pointer.numpy()) == 16
    np.testing.assert_allclose(np.linalg.norm(queue[:16], axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(queue[:16], initial_queue[:16])
    np.testing.assert_array_equal(queue[16:], initial_queue[16:])

    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    restored = tiny_moco()
    tf.train.Checkpoint(model=restored).restore(path).expect_partial()
    np.testing.assert_array_equal(restored.queue.numpy(), queue)
    assert int(restored.queue_pointer.numpy()) == 16
    for (_, key), (_, restored_key) in zip(model._momentum_pairs(), restored._momentum_pairs()):
        np.testing.assert_array_equal(key.numpy(), restored_key.numpy())


def test_keys_are_unshuffled_back_to_their_images():
    model = tiny_moco(moco_bn_splits=1)  # one BatchNorm group: keys must not depend on order
    views = tf.constant(np.random.default_rng(3).uniform(size=(8, IMAGE_SIZE, IMAGE_SIZE, 3)), tf.float32)
    direct = model.key_projection_head(model.key_encoder(views, training=True), training=True)
    np.testing.assert_allclose(model._keys(views, num_views=1), tf.math.l2_normalize(direct, axis=1), atol=1e-5)


@pytest.mark.slow
def test_config_round_trip_and_asymmetric_training():
    model = tiny_moco(moco_symmetric=False)
    clone = assert_config_round_trip(model, momentum=0.9, queue_size=40, symmetric=False, batch_norm_splits=4)
    assert (clone.momentum, clone.queue_size, clone.symmetric, clone.batch_norm_splits) == (0.9, 40, False, 4)
    history = model.fit(*batch(), batch_size=8, epochs=1, verbose=0)
    assert math.isfinite(history.history["loss"][0]) and int(model.queue_pointer.numpy()) == 8


@pytest.mark.parametrize(
    "method_flags",
    [
        pytest.param(
            ["--method=moco_v2", "--temperature=0.2", "--moco_queue_size=256", "--moco_bn_splits=4"], id="moco_v2",
            marks=pytest.mark.slow,
        ),
        # The losses themselves are tested in tests/test_losses.py; these runs only add the command-line path.
        pytest.param(
            ["--loss=hard_negative", "--hard_negative_beta=1.0", "--debias_tau_plus=0.1"], id="hcl", marks=pytest.mark.slow
        ),
        pytest.param(
            ["--loss=hard_negative", "--hard_negative_beta=0", "--debias_tau_plus=0.1"], id="debiased", marks=pytest.mark.slow
        ),
    ],
)
def test_each_method_trains_from_the_command_line(cifar10_500, tmp_path, method_flags):
    status, _, stderr = run_train_main(
        f"--dataset=folder:{cifar10_500}", f"--model_dir={tmp_path}", "--train_steps=3", "--batch_size=32",
        "--width_multiplier=0.125", "--eval_split=", *method_flags,
    )  # fmt: skip
    assert status == 0, stderr[-3000:]
    with open(os.path.join(tmp_path, "train_log.jsonl"), encoding="utf-8") as file:
        log = [json.loads(line) for line in file]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in log)


# The MoCo flag errors (queue smaller than one step's keys, BatchNorm groups that do not divide the
# batch) are tested with the other training flag errors, in tests/test_train_cli.py.


def float_views(n=8, seed=3):
    return tf.constant(np.random.default_rng(seed).uniform(size=(n, IMAGE_SIZE, IMAGE_SIZE, 3)), tf.float32)


def test_key_network_normalises_with_batch_statistics_like_the_query_network():
    # A head with BatchNorm too (MoCo's own has none), so that the head's BatchNorm is checked as well.
    model = tiny_moco(moco_bn_splits=1, proj_batch_norm="all")
    views = float_views()
    for query_layer, key_layer, inputs in [
        (model.encoder, model.key_encoder, views),
        (model.projection_head, model.key_projection_head, model.encoder(views, training=False)),
    ]:
        key_training = key_layer(inputs, training=True).numpy()
        # At initialisation the key network is the query network: same outputs with batch statistics...
        np.testing.assert_allclose(key_training, query_layer(inputs, training=True).numpy(), rtol=1e-5, atol=1e-5)
        # ...and not those of its inference mode (moving statistics 0 and 1), which trainable=False would give.
        assert not np.allclose(key_training, key_layer(inputs, training=False).numpy(), atol=1e-3)
    # Its moving statistics follow its own forward passes during training.
    key_batch_norm = next(layer for layer in model.key_encoder.layers if "bn" in layer.name)
    model.fit(*batch(), batch_size=8, epochs=1, verbose=0)
    assert not np.allclose(key_batch_norm.moving_mean.numpy(), 0.0)


def test_query_and_key_encoders_normalise_each_group_of_each_view_separately():
    model = tiny_moco(moco_bn_splits=2)  # per view: 8 images in 2 groups of 4
    views = tf.concat([float_views(seed=3), float_views(seed=4)], axis=0)  # (16, S, S, 3): two view batches

    def project(encoder, head, images):  # one group alone: Keras' own BatchNorm on its statistics
        return head(encoder(images, training=True), training=True).numpy()

    projection, _ = model._project(model.encoder, model.projection_head, views, num_views=2)
    expected = np.concatenate(
        [project(model.encoder, model.projection_head, views[start : start + 4]) for start in range(0, 16, 4)]
    )
    np.testing.assert_allclose(projection.numpy(), expected, rtol=1e-4, atol=1e-5)

    # Keys: the same groups, drawn from each view's shuffled images; recover the shuffle from the seed.
    state = model.shuffle_seed_generator.state.numpy()
    keys = model._keys(views, num_views=2).numpy()
    model.shuffle_seed_generator.state.assign(state)
    draws = keras.random.uniform([16], seed=model.shuffle_seed_generator).numpy()
    order = np.concatenate([np.argsort(draws[:8]), 8 + np.argsort(draws[8:])])
    expected = np.zeros_like(keys)
    for start in range(0, 16, 4):
        rows = order[start : start + 4]
        group = project(model.key_encoder, model.key_projection_head, tf.gather(views, rows))
        expected[rows] = group / np.linalg.norm(group, axis=1, keepdims=True)
    np.testing.assert_allclose(keys, expected, rtol=1e-4, atol=1e-5)
    # Whole-batch statistics would give other keys: the groups matter.
    whole = project(model.key_encoder, model.key_projection_head, views)
    assert not np.allclose(keys, whole / np.linalg.norm(whole, axis=1, keepdims=True), atol=1e-3)


def demo_objective(model, view1, view2):
    """The MoCo CIFAR-10 demo's symmetric loss, loss_12 + loss_21 (one BatchNorm group per view)."""

    def contrastive_loss(query_images, key_images):
        q = tf.math.l2_normalize(model.projection_head(model.encoder(query_images, training=True), training=True), 1)
        k = model.key_projection_head(model.key_encoder(key_images, training=True), training=True)
        k = tf.stop_gradient(tf.math.l2_normalize(k, 1))
        l_pos = tf.reduce_sum(q * k, axis=1, keepdims=True)  # (N, 1)
        l_neg = tf.matmul(q, model.queue, transpose_b=True)  # (N, K)
        logits = tf.concat([l_pos, l_neg], axis=1) / model.temperature
        labels = tf.zeros(tf.shape(logits)[0], tf.int32)
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))

    return contrastive_loss(view1, view2) + contrastive_loss(view2, view1)


@pytest.mark.slow
def test_one_sgd_step_descends_the_demos_sum_of_both_directions():
    from fixed_views import AlternatingViews

    model = tiny_moco(moco_bn_splits=1, num_classes=None)
    model.augmenter = AlternatingViews()
    learning_rate = 0.5
    model.compile(optimizer=keras.optimizers.SGD(learning_rate))
    images = batch()[0]
    variables = model.trained_variables
    initial = [v.numpy().copy() for v in variables]
    with tf.GradientTape() as tape:
        objective = demo_objective(model, *AlternatingViews.views(images))
    gradients = tape.gradient(objective, variables)
    logs = model.train_on_batch(images, return_dict=True)
    assert logs["loss"] == pytest.approx(float(objective) / 2, rel=1e-5)  # the log: the mean of the two
    for variable, start, gradient in zip(variables, initial, gradients):
        expected_step = -learning_rate * gradient.numpy()
        np.testing.assert_allclose(
            variable.numpy() - start, expected_step, rtol=1e-3, atol=1e-3 * np.abs(expected_step).max(),
            err_msg=variable.path,
        )


def test_moco_head_is_moco_v2s_linear_relu_linear_with_biases():
    model = tiny_moco()
    head = model.projection_head
    assert head.batch_norm == "none" and all(layer is None for layer in head.batch_norm_layers)
    assert all(dense.use_bias for dense in head.dense_layers)
    features = np.random.default_rng(6).normal(size=(5, model.representation_shape[-1])).astype(np.float32)
    first, second = head.dense_layers
    expected = np.maximum(features @ first.kernel.numpy() + first.bias.numpy(), 0.0)
    expected = expected @ second.kernel.numpy() + second.bias.numpy()
    for training in (True, False):  # no BatchNorm: both modes are the same map
        np.testing.assert_allclose(head(features, training=training).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_a_batch_the_batch_norm_splits_do_not_divide_fails_naming_the_setting():
    # 6 images per view in 4 BatchNorm groups: known when traced (a ValueError) or only when run
    # (an assertion), the message names the setting rather than a reshape inside the encoder.
    model = tiny_moco(moco_bn_splits=4)
    images, labels = batch(6)
    with pytest.raises(ValueError, match=r"batch_norm_splits=4 .*divisible by 4 \(got 6\)"):
        model.fit(images, labels, batch_size=6, epochs=1, verbose=0)
    unknown_size = tf.data.Dataset.from_tensor_slices((images, labels)).batch(6)
    assert unknown_size.element_spec[0].shape[0] is None
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"batch_norm_splits=4 .*divisible by 4"):
        model.fit(unknown_size, epochs=1, verbose=0)
