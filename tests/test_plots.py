"""simclr_keras.plots on synthetic logs, features and images: counting by hand, pictures that follow the data."""

import json

import numpy as np
import pytest

from conftest import read_png
from simclr_keras import SimCLRAugmentation, plots


def synthetic_log(steps, loss_offset=0.0, with_probe=True):
    """Records shaped like train_log.jsonl's: a falling loss, a warm-up then decaying rate."""
    records = []
    for step in range(1, steps + 1):
        record = {
            "step": step,
            "time": 1000.0 + step,
            "loss": 5.0 - 2.0 * step / steps + loss_offset,
            "contrastive_accuracy": step / steps,
            "learning_rate": min(step / 10, 1.0) * (1 - step / (steps + 1)),
        }
        if with_probe:
            record.update(probe_loss=2.3 - step / steps, probe_accuracy=0.1 + 0.5 * step / steps)
        records.append(record)
    return records


def write_log(path, records):
    with open(path, "w", encoding="utf-8") as file:
        file.write("".join(json.dumps(record) + "\n" for record in records))
    return path


# --------------------------------------------------------------------------------------
# Counting and reading, separately from drawing
# --------------------------------------------------------------------------------------


def test_confusion_matrix_counts_by_hand():
    labels = [0, 0, 1, 2, 2, 2, 1]
    predictions = [0, 1, 1, 2, 0, 2, 1]
    # Row = true class, column = prediction: class 0 is once right, once taken for 1; class 1 twice
    # right; class 2 twice right, once taken for 0.
    expected = [[1, 1, 0], [0, 2, 0], [1, 0, 2]]
    matrix = plots.confusion_matrix(labels, predictions, num_classes=3)
    assert matrix.dtype == np.int64
    np.testing.assert_array_equal(matrix, expected)
    assert np.trace(matrix) == 5 and matrix.sum() == 7
    # A class absent from both keeps its row and column of zeros.
    np.testing.assert_array_equal(plots.confusion_matrix([0, 1], [1, 1], 4)[2:], np.zeros([2, 4]))


def test_confusion_matrix_rejects_bad_input():
    with pytest.raises(ValueError, match="2 labels for 3 predictions"):
        plots.confusion_matrix([0, 1], [0, 1, 1], 2)
    with pytest.raises(ValueError, match=r"predictions must be in \[0, 2\)"):
        plots.confusion_matrix([0, 1], [0, 2], 2)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        plots.confusion_matrix([-1, 1], [0, 1], 2)


def test_read_train_log_keeps_the_last_record_of_each_step(tmp_path):
    path = tmp_path / "train_log.jsonl"
    # A run killed after step 3, resumed from its step-2 checkpoint: steps 3 and 4 logged again.
    lines = [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}, {"step": 3, "loss": 9.0},
             {"step": 3, "loss": 3.0}, {"step": 4, "loss": 2.0}]  # fmt: skip
    with open(path, "w", encoding="utf-8") as file:
        file.write("\n".join(json.dumps(line) for line in lines) + "\n\n")
    records = plots.read_train_log(path)
    assert [(record["step"], record["loss"]) for record in records] == [(1, 5.0), (2, 4.0), (3, 3.0), (4, 2.0)]


def test_moving_average_by_hand():
    np.testing.assert_allclose(plots.moving_average([1, 2, 3, 4, 5], 2), [1, 1.5, 2.5, 3.5, 4.5])
    np.testing.assert_allclose(plots.moving_average([1, 2, 3, 4, 5], 3), [1, 1.5, 2, 3, 4])
    np.testing.assert_allclose(plots.moving_average([3, 1], 1), [3, 1])


def test_pca_projection_matches_the_covariance_eigendecomposition():
    generator = np.random.default_rng(0)
    # Anisotropic data: standard deviations 5, 2, 1, 0.5 along a random rotation, plus an offset.
    rotation, _ = np.linalg.qr(generator.normal(size=[4, 4]))
    features = (generator.normal(size=[400, 4]) * [5, 2, 1, 0.5]) @ rotation.T + 10
    points, explained = plots.pca_projection(features, dimensions=2)
    assert points.shape == (400, 2)
    eigenvalues = np.sort(np.linalg.eigvalsh(np.cov(features, rowvar=False)))[::-1]
    np.testing.assert_allclose(explained, eigenvalues[:2] / eigenvalues.sum(), rtol=1e-6)
    # The coordinates are centred, uncorrelated, with the leading eigenvalues as variances.
    np.testing.assert_allclose(points.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(np.var(points, axis=0, ddof=1), eigenvalues[:2], rtol=1e-4)
    assert abs(np.corrcoef(points.T)[0, 1]) < 1e-4
    # Points on a line: one component explains everything, and the sign convention is stable.
    line = np.outer(np.arange(10.0), [3.0, -4.0])
    line_points, line_explained = plots.pca_projection(line, dimensions=2)
    np.testing.assert_allclose(line_explained, [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(np.abs(line_points[:, 0]), np.abs(np.arange(10.0) - 4.5) * 5, rtol=1e-5)
    np.testing.assert_array_equal(plots.pca_projection(line)[0], line_points)


# --------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------


def test_training_curves_follow_the_log(tmp_path):
    records = synthetic_log(120)
    first = read_png(plots.save_training_curves(write_log(tmp_path / "a.jsonl", records), tmp_path / "a.png"))
    again = read_png(plots.save_training_curves(write_log(tmp_path / "b.jsonl", records), tmp_path / "b.png"))
    shifted = read_png(
        plots.save_training_curves(write_log(tmp_path / "c.jsonl", synthetic_log(120, 1.0)), tmp_path / "c.png")
    )
    assert first.shape[0] >= 500 and first.shape[1] >= 800, first.shape  # 11 x 7 inches at 100 dpi
    np.testing.assert_array_equal(first, again)  # the same data, the same picture
    assert first.shape == shifted.shape and np.any(first != shifted)  # another loss, another picture


def test_training_curves_without_a_probe_or_steps(tmp_path):
    # Unlabelled data: no probe values; the panel says so instead of failing.
    figure = plots.training_curves_figure(synthetic_log(3, with_probe=False))
    assert any(text.get_text() == "not logged" for axis in figure.axes for text in axis.texts)
    with pytest.raises(ValueError, match="no steps"):
        plots.training_curves_figure([])


def test_confusion_matrix_picture(tmp_path):
    generator = np.random.default_rng(1)
    labels = generator.integers(0, 10, size=300)
    predictions = np.where(generator.random(300) < 0.6, labels, generator.integers(0, 10, size=300))
    names = [f"class {index}" for index in range(10)]
    matrix = plots.save_confusion_matrix(labels, predictions, 10, tmp_path / "confusion.png", names)
    np.testing.assert_array_equal(matrix, plots.confusion_matrix(labels, predictions, 10))
    image = read_png(tmp_path / "confusion.png")
    assert image.shape[0] >= 400 and image.shape[1] >= 400
    # 100 classes: no counts or names written, still a picture.
    many = plots.confusion_matrix_figure(plots.confusion_matrix(np.arange(200) % 100, np.arange(200) % 97, 100))
    assert not many.axes[0].texts


def test_embedding_picture(tmp_path):
    generator = np.random.default_rng(2)
    labels = np.repeat(np.arange(3), 20)
    points = generator.normal(size=[60, 2]) + labels[:, None] * 3
    figure = plots.embedding_figure(points, labels, ["cat", "dog", "ship"], title="test")
    legend = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert legend == ["cat", "dog", "ship"]
    plots._save(figure, tmp_path / "embedding.png")
    read_png(tmp_path / "embedding.png")
    with pytest.raises(ValueError, match="one label each"):
        plots.embedding_figure(points, labels[:10])


def random_images(count, size=32, seed=0):
    """Smooth random colour images, uint8 [count, size, size, 3] (gradients, so that crops differ)."""
    generator = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)
    images = generator.random([count, 1, 1, 3]) * ramp[None, :, None, None] + generator.random([count, 1, 1, 3]) * (
        ramp[None, None, :, None]
    )
    return np.clip(images * 127, 0, 255).astype(np.uint8)


def test_augmented_pairs_are_seeded_and_leave_the_augmenter_state_alone(tmp_path):
    augmenter = SimCLRAugmentation(32, color_jitter_strength=0.5, seed=0)
    state = np.array(augmenter.seed_generator.state.numpy())
    images = random_images(4)
    first = read_png(plots.save_augmented_pairs(images, augmenter, tmp_path / "a.png", seed=0, captions=list("abcd")))
    again = read_png(plots.save_augmented_pairs(images, augmenter, tmp_path / "b.png", seed=0, captions=list("abcd")))
    other = read_png(plots.save_augmented_pairs(images, augmenter, tmp_path / "c.png", seed=1, captions=list("abcd")))
    np.testing.assert_array_equal(first, again)
    assert np.any(first != other)  # other seeds, other views
    np.testing.assert_array_equal(augmenter.seed_generator.state.numpy(), state)
    # Three rows of four images: wider than high.
    assert first.shape[1] > first.shape[0] > 200
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        plots.augmented_pairs_figure(images[0], augmenter)


def test_write_run_plots(tmp_path):
    write_log(tmp_path / "train_log.jsonl", synthetic_log(5))
    written = plots.write_run_plots(str(tmp_path), SimCLRAugmentation(32, seed=0), random_images(8))
    assert sorted(written) == ["augmented_pairs.png", "training_curves.png"]
    for path in written.values():
        read_png(path)
    # Nothing to draw: nothing written, no error.
    assert plots.write_run_plots(str(tmp_path / "empty")) == {}
