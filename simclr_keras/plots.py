"""Pictures of a run that a person would rather look at than read: curves, views, confusions, embeddings.

Every function draws on a `matplotlib.figure.Figure` with its own Agg canvas: nothing goes through
`pyplot`, so no display is needed, no global backend is switched, and the figures of a long-lived
process are freed with their last reference. The `*_figure` functions return the figure (a notebook
shows it with `display(figure)`); the `save_*` functions write a PNG.

- `training_curves_figure` / `save_training_curves`: loss, learning rate, contrastive accuracy and
  online probe and kNN accuracy of `train_log.jsonl` against the global step (`training_curves.png`).
- `augmented_pairs_figure` / `save_augmented_pairs`: a few images, each above its two random views
  from a `SimCLRAugmentation` (`augmented_pairs.png`).
- `confusion_matrix` (the counting) and `confusion_matrix_figure` / `save_confusion_matrix`.
- `pca_projection` (numpy SVD) and `embedding_figure`: features in 2-D, coloured by class.
- `study_figure` / `save_study_figure`: a study's accuracy per variation, mean +- std and every seed.
- `write_run_plots`: what training writes into its model_dir.
"""

import json
import math
import os

import matplotlib  # matplotlib.colormaps: the class colours, without pyplot
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

TRAINING_CURVES = "training_curves.png"
AUGMENTED_PAIRS = "augmented_pairs.png"
# Dots per inch of the written PNGs: figures of about 10 x 7 inches become about 1000 x 700 pixels.
DPI = 100

# (panel title, y-axis label, [(train_log.jsonl key, legend label)], y range or None, smoothed) of the
# curves. The learning rate follows its schedule exactly, so it is never smoothed (a moving average
# would only shift it).
_CURVE_PANELS = (
    ("Loss", "loss", [("loss", "contrastive loss"), ("probe_loss", "probe cross-entropy")], None, True),
    ("Learning rate", "learning rate", [("learning_rate", "learning rate")], None, False),
    ("Contrastive accuracy", "accuracy", [("contrastive_accuracy", "positive ranked first")], (0.0, 1.0), True),
    (
        "Online accuracy",
        "accuracy",
        [("probe_accuracy", "linear probe top-1 (training batches)"), ("knn_top1", "kNN top-1 (held-out subset)")],
        (0.0, 1.0),
        True,
    ),
)


def _new_figure(width, height):
    """A figure of width x height inches on an Agg canvas; constrained layout keeps labels apart."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    figure.savefig(path, dpi=DPI, facecolor="white")
    return path


# --------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------


def read_train_log(path):
    """The records of a train_log.jsonl, one per global step, sorted by step.

    A run resumed from a checkpoint older than its last logged step logs those steps again; the
    later record of a step wins, since it belongs to the run that went on. Blank lines are skipped.
    """
    by_step = {}
    with open(path, encoding="utf-8") as file:
        for line in file:
            if line.strip():
                record = json.loads(line)
                by_step[int(record["step"])] = record
    return [by_step[step] for step in sorted(by_step)]


def moving_average(values, window):
    """Trailing mean over the last `window` values (fewer at the start), same length as `values`."""
    values = np.asarray(values, np.float64)
    if window <= 1 or values.size == 0:
        return values
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    ends = np.arange(1, values.size + 1)
    starts = np.maximum(ends - window, 0)
    return (cumulative[ends] - cumulative[starts]) / (ends - starts)


def training_curves_figure(records, title="Training curves"):
    """Four panels against the global step: loss, learning rate, contrastive and online accuracy.

    Logged values are each step's own, so they are noisy: with more than 50 steps each curve is drawn
    faintly with its trailing moving average (window: 1/25 of the steps) on top. A value that the log
    does not hold (no probe without labels) leaves its panel with a note instead.

    Args:
      records: dicts with "step" and any of loss, probe_loss, learning_rate, contrastive_accuracy,
        probe_accuracy, knn_top1 (the lines of train_log.jsonl; see `read_train_log`).
    """
    if not records:
        raise ValueError("the training log holds no steps to plot.")
    figure = _new_figure(11, 7)
    figure.suptitle(f"{title} ({len(records)} steps)")
    axes = figure.subplots(2, 2, sharex=True)
    window = max(1, len(records) // 25) if len(records) > 50 else 1
    for axis, (panel_title, y_label, keys, y_range, smoothed) in zip(axes.flat, _CURVE_PANELS):
        axis.set_title(panel_title)
        drawn = False
        for (key, label), colour in zip(keys, ("tab:blue", "tab:orange")):
            points = [(record["step"], record[key]) for record in records if record.get(key) is not None]
            if not points:
                continue
            steps, values = (np.asarray(column, np.float64) for column in zip(*points))
            # Sparse values (the kNN monitor's, every N epochs) are drawn as measured.
            if window > 1 and smoothed and len(steps) > 50:
                axis.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
                axis.plot(steps, moving_average(values, window), color=colour, label=f"{label} (mean of {window})")
            else:
                marker = "o" if len(steps) < 20 else None  # a few points: show where the steps are
                axis.plot(steps, values, color=colour, marker=marker, markersize=3, label=label)
            drawn = True
        if drawn:
            axis.legend(loc="best", fontsize="small")
            if y_range is not None:
                axis.set_ylim(y_range[0] - 0.02, y_range[1] + 0.02)
        else:
            axis.text(0.5, 0.5, "not logged", ha="center", va="center", transform=axis.transAxes, color="gray")
        axis.set_ylabel(y_label)
        axis.grid(True, alpha=0.3)
    for axis in axes[-1]:
        axis.set_xlabel("step")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    return figure


def save_training_curves(log_path, output_path, title="Training curves"):
    """Writes `training_curves_figure` of the train_log.jsonl at `log_path` as a PNG; returns its path."""
    return _save(training_curves_figure(read_train_log(log_path), title), output_path)


# --------------------------------------------------------------------------------------
# Augmented view pairs
# --------------------------------------------------------------------------------------


def augmented_pairs_figure(images, augmenter, seed=0, captions=None, title="Two random views of each image"):
    """A grid: one column per image, holding the image and below it its two augmented views.

    The views are `augmenter(images, training=True, seed=...)` with two stateless seeds drawn from
    `seed`, so the figure is reproducible and the augmenter's own random state is left untouched.
    The top row is the evaluation view, `augmenter(images, training=False)`, what the encoder sees
    at test time.

    Args:
      images: uint8 [N, H, W, 3] (a few, e.g. 8).
      augmenter: a `simclr_keras.SimCLRAugmentation` (called with training and seed).
      captions: optional text above each column (e.g. the class names), one per image.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"images must be [N, H, W, 3] with N >= 1, got shape {images.shape}.")
    rows = [
        ("image", augmenter(images, training=False)),
        ("view 1", augmenter(images, training=True, seed=np.array([seed, 1], np.int32))),
        ("view 2", augmenter(images, training=True, seed=np.array([seed, 2], np.int32))),
    ]
    count = images.shape[0]
    figure = _new_figure(1.3 * count + 0.6, 1.3 * len(rows) + 0.5)
    figure.suptitle(title)
    axes = figure.subplots(len(rows), count, squeeze=False)
    for row, (row_label, views) in enumerate(rows):
        views = np.clip(np.asarray(views, np.float32), 0.0, 1.0)  # [N, S, S, 3] in [0, 1]
        for column in range(count):
            axis = axes[row, column]
            axis.imshow(views[column], interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if column == 0:
                axis.set_ylabel(row_label)
            if row == 0 and captions is not None and column < len(captions):
                axis.set_title(str(captions[column]), fontsize="small")
    return figure


def save_augmented_pairs(images, augmenter, output_path, seed=0, captions=None):
    """Writes `augmented_pairs_figure` as a PNG; returns its path."""
    return _save(augmented_pairs_figure(images, augmenter, seed, captions), output_path)


# --------------------------------------------------------------------------------------
# Confusion matrix
# --------------------------------------------------------------------------------------


def confusion_matrix(labels, predictions, num_classes):
    """Counts int64 [C, C]: entry [i, j] is the number of examples of true class i predicted as j.

    Rows sum to the number of examples of each class and the trace is the number of correct ones.
    """
    labels = np.asarray(labels, np.int64).reshape(-1)
    predictions = np.asarray(predictions, np.int64).reshape(-1)
    if labels.shape != predictions.shape:
        raise ValueError(f"{labels.size} labels for {predictions.size} predictions.")
    for name, values in (("labels", labels), ("predictions", predictions)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} must be in [0, {num_classes}), found {values.min()}..{values.max()}.")
    # Each (true, predicted) pair is one cell of the flattened matrix.
    counts = np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def confusion_matrix_figure(matrix, class_names=None, title="Confusion matrix"):
    """The matrix as a heat map of each true class's fractions, with the counts written in the cells.

    Colours are row fractions (per-class recall on the diagonal), so rare and common classes read on
    one scale; counts are written when there are at most 20 classes, class names at most 40.
    """
    matrix = np.asarray(matrix, np.int64)
    num_classes = matrix.shape[0]
    if matrix.shape != (num_classes, num_classes):
        raise ValueError(f"a confusion matrix is square, got shape {matrix.shape}.")
    if class_names is None or len(class_names) != num_classes:
        class_names = [str(index) for index in range(num_classes)]
    row_totals = matrix.sum(axis=1, keepdims=True)
    fractions = matrix / np.maximum(row_totals, 1)
    total = int(matrix.sum())
    accuracy = np.trace(matrix) / total if total else 0.0

    side = min(max(4.0, 0.45 * num_classes + 2.5), 16.0)
    figure = _new_figure(side + 1.2, side)
    axis = figure.subplots()
    image = axis.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axis, label="fraction of the true class", shrink=0.8)
    axis.set_title(f"{title}\n{total} examples, accuracy {accuracy:.1%}")
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    if num_classes <= 40:
        axis.set_xticks(range(num_classes), class_names, rotation=45, ha="right", rotation_mode="anchor")
        axis.set_yticks(range(num_classes), class_names)
    if num_classes <= 20:
        for true_class in range(num_classes):
            for predicted_class in range(num_classes):
                count = matrix[true_class, predicted_class]
                if count:
                    dark = fractions[true_class, predicted_class] > 0.5
                    axis.text(
                        predicted_class, true_class, str(count), ha="center", va="center",
                        fontsize="small", color="white" if dark else "black",
                    )  # fmt: skip
    return figure


def save_confusion_matrix(labels, predictions, num_classes, output_path, class_names=None, title="Confusion matrix"):
    """Counts with `confusion_matrix` and writes `confusion_matrix_figure` as a PNG; returns the counts."""
    matrix = confusion_matrix(labels, predictions, num_classes)
    _save(confusion_matrix_figure(matrix, class_names, title), output_path)
    return matrix


# --------------------------------------------------------------------------------------
# Embeddings in two dimensions
# --------------------------------------------------------------------------------------


def pca_projection(features, dimensions=2):
    """Principal component analysis by SVD of the centred features.

    Returns (points float32 [N, dimensions], explained float [dimensions]): the coordinates along the
    leading principal directions, and the fraction of the total variance each direction explains.
    Each direction's sign is fixed so that its largest-magnitude loading is positive, which makes the
    picture deterministic.
    """
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got shape {features.shape}.")
    centred = features - features.mean(axis=0)
    # centred = U S V^T; the rows of V^T are the principal directions, U S the coordinates.
    left, singular_values, directions = np.linalg.svd(centred, full_matrices=False)
    dimensions = min(dimensions, singular_values.size)
    signs = np.sign(directions[np.arange(dimensions), np.argmax(np.abs(directions[:dimensions]), axis=1)])
    signs[signs == 0] = 1.0
    points = left[:, :dimensions] * singular_values[:dimensions] * signs
    variances = singular_values**2
    explained = variances[:dimensions] / max(variances.sum(), 1e-30)
    return points.astype(np.float32), explained


def embedding_figure(points, labels, class_names=None, title="Embeddings", axis_labels=("component 1", "component 2")):
    """A scatter plot of 2-D points [N, 2], one colour per class, with a legend of class names."""
    points = np.asarray(points, np.float32)
    labels = np.asarray(labels, np.int64).reshape(-1)
    if points.ndim != 2 or points.shape[1] != 2 or points.shape[0] != labels.size:
        raise ValueError(f"points must be [N, 2] with one label each, got {points.shape} and {labels.size} labels.")
    classes = np.unique(labels)
    figure = _new_figure(8.5, 6.5)
    axis = figure.subplots()
    # tab10 / tab20 give distinct colours up to 20 classes; beyond that a continuous map.
    colour_map = "tab10" if classes.size <= 10 else "tab20" if classes.size <= 20 else "viridis"
    palette = matplotlib.colormaps[colour_map].resampled(max(classes.size, 2))
    for position, class_index in enumerate(classes):
        members = labels == class_index
        named = class_names is not None and 0 <= class_index < len(class_names)
        name = class_names[class_index] if named else str(class_index)
        axis.scatter(
            points[members, 0], points[members, 1], s=12, alpha=0.75, color=palette(position), label=name, linewidths=0
        )
    axis.set_title(title)
    axis.set_xlabel(axis_labels[0])
    axis.set_ylabel(axis_labels[1])
    axis.grid(True, alpha=0.3)
    if classes.size <= 20:
        axis.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small", markerscale=1.5, frameon=False)
    return figure


# --------------------------------------------------------------------------------------
# A study: accuracy per variation over seeds
# --------------------------------------------------------------------------------------


def study_figure(values, variation_names, metric_names, baseline=None, title="Study"):
    """One panel per metric: each variation's mean as a bar with +-1 std, and every seed as a dot.

    Args:
      values: {variation: {metric: [value per seed]}} with accuracies in [0, 1] (drawn as %).
      variation_names: the bars, in order; baseline: the variation drawn in another colour.
    """
    columns = min(len(metric_names), 2)
    rows = math.ceil(len(metric_names) / columns)
    figure = _new_figure(max(4.5, 1.0 + 0.9 * len(variation_names)) * columns, 4.2 * rows)
    figure.suptitle(title)
    axes = figure.subplots(rows, columns, squeeze=False)
    positions = np.arange(len(variation_names))
    for axis, metric in zip(axes.flat, metric_names):
        for position, name in zip(positions, variation_names):
            seeds = 100.0 * np.asarray(values.get(name, {}).get(metric, []), np.float64)
            if seeds.size == 0:
                continue
            spread = seeds.std(ddof=1) if seeds.size > 1 else 0.0
            colour = "tab:orange" if name == baseline else "tab:blue"
            axis.bar(position, seeds.mean(), yerr=spread, color=colour, alpha=0.6, capsize=4)
            axis.scatter(np.full(seeds.size, position), seeds, color="black", s=10, zorder=3)
        axis.set_title(metric)
        axis.set_ylabel("accuracy (%)")
        axis.set_xticks(positions, variation_names, rotation=30, ha="right", rotation_mode="anchor")
        axis.grid(True, axis="y", alpha=0.3)
    for axis in list(axes.flat)[len(metric_names):]:
        axis.set_visible(False)
    return figure


def save_study_figure(values, variation_names, metric_names, baseline, output_path, title="Study"):
    """Writes `study_figure` as a PNG; returns its path."""
    return _save(study_figure(values, variation_names, metric_names, baseline, title), output_path)


# --------------------------------------------------------------------------------------
# A training run's pictures
# --------------------------------------------------------------------------------------


def write_run_plots(model_dir, augmenter=None, images=None, captions=None, seed=0):
    """Writes MODEL_DIR/training_curves.png (from its train_log.jsonl) and augmented_pairs.png.

    The pairs are drawn when `augmenter` and `images` (uint8 [N, H, W, 3], a few) are given, with
    `captions` (e.g. class names) above the columns.
    Returns {file name: path} of what was written; a missing or empty log writes no curves.
    """
    written = {}
    log_path = os.path.join(model_dir, "train_log.jsonl")
    if os.path.isfile(log_path) and read_train_log(log_path):
        written[TRAINING_CURVES] = save_training_curves(log_path, os.path.join(model_dir, TRAINING_CURVES))
    if augmenter is not None and images is not None and len(images):
        written[AUGMENTED_PAIRS] = save_augmented_pairs(
            images, augmenter, os.path.join(model_dir, AUGMENTED_PAIRS), seed, captions
        )
    return written
