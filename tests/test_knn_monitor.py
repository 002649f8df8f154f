"""The online kNN monitor (simclr_keras.knn_monitor, --knn_every_n_epochs): the value and where it is logged."""

import glob
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import tensorflow as tf

from simclr_keras import plots
from simclr_keras.knn_monitor import KnnMonitor


def _pixel_model():
    """A stand-in SimCLR model whose features are the images' own pixels (h = the values / 255 - 0.5)."""
    augmenter = lambda images, training: tf.cast(images, tf.float32) / 255.0 - 0.5  # noqa: E731
    encoder = lambda images, training: tf.reshape(images, [tf.shape(images)[0], -1])  # noqa: E731
    return types.SimpleNamespace(augmenter=augmenter, encoder=encoder)


def _hand_knn_top1(memory, memory_labels, queries, query_labels, k, temperature, num_classes):
    """The weighted cosine kNN vote (Wu et al. 2018), one query at a time with plain numpy."""
    correct = 0
    for query, label in zip(queries, query_labels):
        similarities = [
            float(np.dot(query, item) / (np.linalg.norm(query) * np.linalg.norm(item))) for item in memory
        ]
        nearest = sorted(range(len(memory)), key=lambda index: -similarities[index])[:k]
        votes = [0.0] * num_classes
        for index in nearest:
            votes[memory_labels[index]] += np.exp(similarities[index] / temperature)
        correct += int(np.argmax(votes) == label)
    return correct / len(queries)


def test_the_monitor_measures_the_weighted_knn_vote_of_a_hand_computation():
    generator = np.random.default_rng(3)
    memory = generator.integers(1, 256, size=[12, 2, 2, 1]).astype(np.uint8)
    memory_labels = np.array([0, 1, 2] * 4)
    queries = generator.integers(1, 256, size=[9, 2, 2, 1]).astype(np.uint8)
    query_labels = np.array([0, 1, 2] * 3)
    measured, expected = [], []
    for k, temperature in [(4, 0.5), (7, 0.01), (12, 1.0), (12, 0.01)]:
        monitor = KnnMonitor(memory, memory_labels, queries, query_labels, 5, 1, 3, k, temperature, batch_size=5)
        monitor.set_model(_pixel_model())
        measured.append(monitor.measure())
        expected.append(
            _hand_knn_top1(
                memory.reshape(12, -1) / 255.0 - 0.5, memory_labels, queries.reshape(9, -1) / 255.0 - 0.5, query_labels,
                k, temperature, 3,
            )  # fmt: skip
        )
    assert len(set(expected)) > 2  # k and the temperature both change the vote here
    assert measured == pytest.approx(expected)


def test_the_monitor_adds_its_value_only_at_every_n_th_epoch_end():
    images = np.arange(16, dtype=np.uint8).reshape(4, 2, 2, 1) + 1
    monitor = KnnMonitor(images, [0, 1, 0, 1], images, [0, 1, 0, 1], steps_per_epoch=3, every_n_epochs=2, num_classes=2)
    model = _pixel_model()
    model.optimizer = types.SimpleNamespace(iterations=tf.Variable(0, dtype=tf.int64))
    monitor.set_model(model)
    logged_steps = []
    for step in range(1, 14):
        model.optimizer.iterations.assign(step)
        logs = {"loss": 1.0}
        monitor.on_train_batch_end(step - 1, logs)
        if "knn_top1" in logs:
            logged_steps.append(step)
    assert logged_steps == [6, 12]
    assert [step for step, _ in monitor.history] == [6, 12]


def test_bad_arguments_name_the_value_received():
    images = np.zeros([2, 2, 2, 1], np.uint8)
    with pytest.raises(ValueError, match="every_n_epochs=0"):
        KnnMonitor(images, [0, 1], images, [0, 1], 3, 0, 2)
    with pytest.raises(ValueError, match="2 memory images for 3 labels"):
        KnnMonitor(images, [0, 1, 0], images, [0, 1], 3, 1, 2)


def _write_folder(root, counts):
    """An image folder root/{train,test}/{a,b}/*.png of 8 x 8 images; returns {split: sorted pixel bytes}."""
    generator, pixels = np.random.default_rng(5), {}
    for split, per_class in counts.items():
        for name in ("a", "b"):
            os.makedirs(os.path.join(root, split, name))
            for index in range(per_class):
                image = generator.integers(0, 256, [8, 8, 3], dtype=np.uint8)
                tf.io.write_file(os.path.join(root, split, name, f"{index}.png"), tf.io.encode_png(image))
                pixels.setdefault(split, []).append(image.tobytes())
    return {split: sorted(values) for split, values in pixels.items()}


@pytest.mark.parametrize(
    "settings, memory_size",
    [(dict(), 2), (dict(knn_memory="train"), 10), (dict(knn_memory="train", max_train_examples=6), 6)],
)
def test_the_memory_bank_is_the_subset_or_the_whole_training_split(tmp_path, settings, memory_size):
    from simclr_keras.train_config import TrainConfig
    from simclr_keras.train_run import _knn_monitor

    pixels = _write_folder(str(tmp_path / "data"), {"train": 5, "test": 3})
    config = TrainConfig(
        dataset=f"folder:{tmp_path / 'data'}", model_dir=str(tmp_path / "run"), image_size=8, knn_every_n_epochs=1,
        knn_subset=2, knn_temperature=0.5, **settings,
    )  # fmt: skip
    assert config.validate() == []
    (monitor,) = _knn_monitor(config, num_classes=2, steps_per_epoch=3)
    assert len(monitor.memory_images) == len(monitor.memory_labels) == memory_size
    assert len(monitor.query_images) == 2 and monitor.temperature == 0.5
    memory = sorted(image.tobytes() for image in monitor.memory_images)
    if memory_size == 10:  # the whole split: every training image, as its PNG holds it
        assert memory == pixels["train"]
    assert set(memory) <= set(pixels["train"])


def test_the_monitors_temperature_must_be_positive():
    from simclr_keras.train_config import TrainConfig

    assert "knn_temperature must be > 0, got 0.0." in TrainConfig(model_dir="x", knn_temperature=0.0).validate()
    problems = " ".join(TrainConfig(model_dir="x", knn_memory="all").validate())
    assert "knn_memory" in problems and "'all'" in problems


def test_the_training_curves_draw_the_knn_points():
    records = [{"step": step, "loss": 5.0 - step / 100, "probe_accuracy": 0.1} for step in range(1, 101)]
    records[49]["knn_top1"], records[99]["knn_top1"] = 0.2, 0.3
    figure = plots.training_curves_figure(records)
    lines = [line for axis in figure.axes for line in axis.lines if line.get_label().startswith("kNN top-1")]
    assert len(lines) == 1
    # Two measured points, drawn as measured (no moving average over sparse values).
    np.testing.assert_allclose(lines[0].get_xdata(), [50, 100])
    np.testing.assert_allclose(lines[0].get_ydata(), [0.2, 0.3])


def _run(module, *flags):
    return subprocess.run([sys.executable, "-m", module, *flags], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_training_logs_the_knn_of_the_evaluation_command_at_the_epoch_ends(cifar10_500, tmp_path):
    model_dir = str(tmp_path / "run")
    # 500 images at batch 100: 5 steps per epoch, 4 epochs, kNN every 2 epochs: steps 10 and 20.
    result = _run(
        "simclr_keras.train", f"--dataset=folder:{cifar10_500}", f"--model_dir={model_dir}", "--batch_size=100",
        "--train_epochs=4", "--warmup_epochs=0", "--width_multiplier=0.125", "--knn_every_n_epochs=2",
        "--knn_subset=100", "--eval_batch_size=100",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = plots.read_train_log(os.path.join(model_dir, "train_log.jsonl"))
    assert [record["step"] for record in records] == list(range(1, 21))
    knn = {record["step"]: record["knn_top1"] for record in records if "knn_top1" in record}
    assert sorted(knn) == [10, 20]
    # The last value is the evaluation command's kNN of the final checkpoint on the same images:
    # 100 training images (10 per class) as memory, the 100 test images as queries, k=200 -> 100, T=0.1.
    output = str(tmp_path / "knn.json")
    result = _run(
        "simclr_keras.evaluate", "--protocol=knn", f"--model_dir={model_dir}", f"--dataset=folder:{cifar10_500}",
        "--max_train_examples=100", f"--output={output}", "--confusion_matrix=",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with open(output, encoding="utf-8") as file:
        evaluated = json.load(file)
    assert evaluated["num_train"] == 100 and evaluated["num_test"] == 100
    assert knn[20] == pytest.approx(evaluated["top1"], abs=1e-9)
    # TensorBoard holds the same scalar.
    tags = set()
    for path in glob.glob(os.path.join(model_dir, "tensorboard", "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(value.tag for value in event.summary.value)
    assert "knn_top1" in tags
