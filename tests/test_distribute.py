"""Multi-replica training on 2 logical CPU devices: global negatives, global BatchNorm, randomness.

The reference for every check is the same computation on one device with the concatenated batch.
"""

import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_keras import ProjectionHead, SimCLR, SimCLRAugmentation, losses, resnet
from simclr_keras.optimizers import LARS
from strategies import mirrored

IMAGE_SIZE = 16




def per_replica(strategy, fn, *args):
    """Runs fn on every replica; returns the list of its per-replica results (as numpy)."""
    results = strategy.run(fn, args=args)
    return [tf.nest.map_structure(lambda t: t.numpy(), r) for r in strategy.experimental_local_results(results)]


def split_over_replicas(strategy, array):
    """Replica r gets rows [r*B, (r+1)*B) of `array`, the split `fit` makes of a global batch."""
    halves = np.split(array, strategy.num_replicas_in_sync)
    return strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant(halves[context.replica_id_in_sync_group])
    )


def test_nt_xent_gathers_negatives_from_every_replica_and_its_gradient_matches():
    strategy = mirrored()
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(8, 5)).astype(np.float32), rng.normal(size=(8, 5)).astype(np.float32)

    def replica_loss_and_gradient(a, b):
        with tf.GradientTape() as tape:
            tape.watch([a, b])
            loss = losses.nt_xent(a, b, 0.5)
        return loss, tape.gradient(loss, a)

    results = per_replica(strategy, replica_loss_and_gradient, split_over_replicas(strategy, z1), split_over_replicas(strategy, z2))
    with tf.GradientTape() as tape:
        a = tf.constant(z1)
        tape.watch(a)
        single = losses.nt_xent(a, tf.constant(z2), 0.5)
    single_gradient = tape.gradient(single, a).numpy()

    replica_losses = [loss for loss, _ in results]
    assert np.mean(replica_losses) == pytest.approx(float(single), abs=1e-6)
    # Each replica's loss uses the other's projections, and the gather's gradient sums over the
    # replicas that used them: replica r holds d(sum of replica losses)/d z_r = R * d(mean)/d z_r.
    gathered_gradient = np.concatenate([gradient for _, gradient in results]) / 2
    np.testing.assert_allclose(gathered_gradient, single_gradient, atol=1e-6)
    # Without the gather each replica would see only its own 2B - 2 = 6 negatives.
    local_only = np.mean([float(losses.nt_xent(h1, h2, 0.5)) for h1, h2 in zip(np.split(z1, 2), np.split(z2, 2))])
    assert abs(local_only - float(single)) > 0.1


def test_augmentations_differ_between_replicas():
    strategy = mirrored()
    with strategy.scope():
        augmenter = SimCLRAugmentation(IMAGE_SIZE, seed=3)
    images = np.full((4, IMAGE_SIZE, IMAGE_SIZE, 3), 128, np.uint8)
    images[:, :, : IMAGE_SIZE // 2] = 30  # a left/right pattern that crops and flips change
    views = per_replica(strategy, lambda x: augmenter(x, training=True), tf.constant(images))
    assert not np.allclose(views[0], views[1])


def test_synchronized_batchnorm_statistics_equal_single_device_ones():
    strategy = mirrored()
    rng = np.random.default_rng(1)
    features = (rng.normal(size=(8, 6)) * 3 + 1).astype(np.float32)
    with strategy.scope():
        synchronized = keras.layers.BatchNormalization(synchronized=True, momentum=0.9)
        synchronized.build((None, 6))
    single = keras.layers.BatchNormalization(momentum=0.9)
    single.build((None, 6))
    outputs = per_replica(strategy, lambda x: synchronized(x, training=True), split_over_replicas(strategy, features))
    expected = single(features, training=True).numpy()
    np.testing.assert_allclose(np.concatenate(outputs), expected, atol=1e-5)
    np.testing.assert_allclose(synchronized.moving_mean.numpy(), single.moving_mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(synchronized.moving_variance.numpy(), single.moving_variance.numpy(), atol=1e-6)


class ScaleOnly(keras.layers.Layer):
    """An augmenter without randomness (views = scaled images), so that both runs see the same views."""

    def call(self, images, training=True):
        return tf.cast(images, self.compute_dtype) / 255.0


def one_step(strategy, images, labels, learning_rate=0.02):
    with strategy.scope():
        keras.utils.set_random_seed(7)
        model = SimCLR(
            encoder=resnet(depth=18, width_multiplier=0.125, image_size=IMAGE_SIZE, synchronized_batch_norm=True),
            projection_head=ProjectionHead(output_dim=16, synchronized_batch_norm=True),
            augmenter=ScaleOnly(),
            temperature=0.5,
            num_classes=3,
            synchronized_batch_norm=True,
        )
        model.compile(optimizer=LARS(learning_rate, weight_decay=1e-4))
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(len(images))
    history = model.fit(dataset, epochs=1, verbose=0)
    return history.history, model.get_weights()


@pytest.mark.slow
def test_two_replicas_of_b_equal_one_replica_of_2b_after_an_optimizer_step():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (16, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    labels = rng.integers(0, 3, 16)
    single_logs, single_weights = one_step(tf.distribute.get_strategy(), images, labels)
    replicated_logs, replicated_weights = one_step(mirrored(), images, labels)

    for name in ("loss", "contrastive_accuracy", "probe_loss", "probe_accuracy"):
        assert replicated_logs[name][0] == pytest.approx(single_logs[name][0], abs=1e-5), name
    # A small learning rate keeps float32 round-off small next to the tolerance: the BatchNorm scale
    # gradients cancel heavily, and merely swapping the batch's halves on one device moves them by
    # about 4e-3 of the update (2e-4 at LARS lr 0.5, 2e-4 * 0.02 / 0.5 here).
    largest = max(float(np.max(np.abs(a - b))) for a, b in zip(single_weights, replicated_weights))
    assert largest < 1e-5
    # The step did move the weights well beyond the tolerance, so the comparison is not between two
    # initialisations, and a wrong scaling (a loss counted twice, per-replica negatives) would show.
    keras.utils.set_random_seed(7)
    initial = resnet(depth=18, width_multiplier=0.125, image_size=IMAGE_SIZE).get_weights()
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(initial, single_weights)) > 1e-3


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_workers_on_loopback_train_to_identical_weights(cifar10_500, tmp_path):
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    command = [
        sys.executable, "-m", "simclr_keras.train", f"--dataset=folder:{cifar10_500}",
        f"--model_dir={tmp_path / 'run'}", "--strategy=multi_worker", "--train_steps=2", "--batch_size=64",
        "--width_multiplier=0.125", "--eval_split=",
    ]
    workers = [
        subprocess.Popen(
            command,
            env={**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [worker.communicate(timeout=300) for worker in workers]
    for worker, (_, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr[-3000:]
    fingerprints = [
        next(line for line in stdout.splitlines() if "sum of squared weights" in line).split()[-1]
        for stdout, _ in outputs
    ]
    assert fingerprints[0] == fingerprints[1]
    # Only the chief (worker 0) writes the run: 2 steps logged once, a checkpoint at step 2.
    with open(tmp_path / "run" / "train_log.jsonl", encoding="utf-8") as file:
        assert [json.loads(line)["step"] for line in file] == [1, 2]
    assert (tmp_path / "run" / "checkpoints" / "ckpt-2.index").exists()
    # Only the chief took the run directory's lock (a second holder would have failed to start).
    assert json.loads((tmp_path / "run" / "train.lock").read_text())["pid"] == workers[0].pid
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_precision_auto_follows_the_hardware(tmp_path, monkeypatch):
    from simclr_keras import distribute

    # Flag lines as Linux writes them in /proc/cpuinfo: one AVX-512 CPU without bfloat16, one with AMX.
    plain = tmp_path / "plain"
    plain.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n")
    amx = tmp_path / "amx"
    amx.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f amx_bf16 amx_tile\n")
    assert not distribute.cpu_has_bfloat16(str(plain), environ={})
    assert distribute.cpu_has_bfloat16(str(amx), environ={})
    assert not distribute.cpu_has_bfloat16(str(tmp_path / "missing"), environ={})
    # An AVX2-only CPU, or oneDNN capped below its bfloat16 kernels: bfloat16 would be emulated, slowly.
    avx2 = tmp_path / "avx2"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    assert not distribute.cpu_has_bfloat16(str(avx2), environ={})
    for cap in ("AVX2", "avx512_core_vnni"):
        assert not distribute.cpu_has_bfloat16(str(amx), environ={"ONEDNN_MAX_CPU_ISA": cap})
    assert not distribute.cpu_has_bfloat16(str(amx), environ={"TF_ENABLE_ONEDNN_OPTS": "0"})
    assert distribute.cpu_has_bfloat16(str(amx), environ={"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"})

    strategy = tf.distribute.get_strategy()  # no GPU and no TPU here
    monkeypatch.setattr(distribute, "cpu_has_bfloat16", lambda: True)
    assert distribute.resolve_precision("auto", strategy) == "mixed_bfloat16"
    monkeypatch.setattr(distribute, "cpu_has_bfloat16", lambda: False)
    assert distribute.resolve_precision("auto", strategy) == "float32"
    assert distribute.resolve_precision("mixed_float16", strategy) == "mixed_float16"
    with pytest.raises(ValueError, match="precision must be one of"):
        distribute.resolve_precision("float16", strategy)
