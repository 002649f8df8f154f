"""Evaluation: the protocols against their definitions, `Encoder`, `EvalConfig`, `evaluate_encoder` and
`python -m simclr_keras.evaluate` on a tiny trained run.

One subprocess runs the command line end to end; everything else (flag errors included) runs in this
process: `evaluate.main` on a private absl FlagValues, or `evaluate_encoder(EvalConfig(...))`.
"""

import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags as absl_flags
from conftest import BAD_FILES, read_png, run_evaluate_main, run_train_main
from test_fidelity_evaluation import hand_head_forward, official_center_crop

from simclr_keras import data, evaluate, evaluation, export, runs
from simclr_keras.encoder import Encoder
from simclr_keras.eval_config import EvalConfig
from simclr_keras.eval_run import EvaluationError, evaluate_encoder


def reference_knn_scores(train_features, train_labels, test_features, k, temperature, num_classes):
    """Class scores written from the InstDisc definition, one test example at a time."""
    train = train_features / np.linalg.norm(train_features, axis=1, keepdims=True)
    test = test_features / np.linalg.norm(test_features, axis=1, keepdims=True)
    scores = np.zeros([len(test), num_classes])
    for row, query in enumerate(test):
        similarities = train @ query
        for neighbour in np.argsort(-similarities)[:k]:
            scores[row, train_labels[neighbour]] += np.exp(similarities[neighbour] / temperature)
    return scores


def random_features(seed, num_train=120, num_test=40, dimension=16, num_classes=6):
    generator = np.random.default_rng(seed)
    return (
        generator.normal(size=[num_train, dimension]).astype(np.float32),
        generator.integers(0, num_classes, size=num_train),
        generator.normal(size=[num_test, dimension]).astype(np.float32),
        generator.integers(0, num_classes, size=num_test),
    )


# --------------------------------------------------------------------------------------
# kNN and top-k accuracy
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("k, temperature", [(30, 0.1), (60, 0.5)])
def test_knn_matches_the_instdisc_definition(k, temperature):
    train_features, train_labels, test_features, test_labels = random_features(seed=k)
    predictions, scores = evaluation.knn_classify(train_features, train_labels, test_features, k, temperature, 6)
    reference = reference_knn_scores(train_features, train_labels, test_features, k, temperature, 6)
    # Tie-free: every class gets a distinct score in every row, so top-1 and top-5 are unambiguous.
    assert all(len(np.unique(row)) == 6 for row in reference)

    assert scores.shape == (40, 6)
    # Scores are vote shares: the reference votes divided by their row sums.
    np.testing.assert_allclose(scores, reference / reference.sum(axis=1, keepdims=True), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(predictions, np.argmax(reference, axis=1))
    reference_top5 = np.argsort(-reference, axis=1)[:, :5]
    expected_top5 = np.mean([label in row for label, row in zip(test_labels, reference_top5)])
    assert evaluation.top_k_accuracy(scores, test_labels, 5) == pytest.approx(expected_top5)
    assert evaluation.top_k_accuracy(scores, test_labels, 1) == pytest.approx(np.mean(predictions == test_labels))


def test_knn_with_one_neighbour_predicts_the_nearest_label():
    train_features, train_labels, test_features, _ = random_features(seed=2)
    predictions, _ = evaluation.knn_classify(train_features, train_labels, test_features, k=1, num_classes=6)
    train = train_features / np.linalg.norm(train_features, axis=1, keepdims=True)
    nearest = np.argmax(test_features @ train.T, axis=1)  # the test norm does not change the argmax
    np.testing.assert_array_equal(predictions, train_labels[nearest])


def test_knn_with_k_above_the_training_set_uses_every_training_example():
    train_features, train_labels, test_features, _ = random_features(seed=3, num_train=30)
    _, scores = evaluation.knn_classify(train_features, train_labels, test_features, k=1000, num_classes=6)
    reference = reference_knn_scores(train_features, train_labels, test_features, 30, 0.1, 6)
    np.testing.assert_allclose(scores, reference / reference.sum(axis=1, keepdims=True), rtol=1e-4, atol=1e-6)


def test_knn_in_chunks_equals_knn_in_one_block():
    train_features, train_labels, test_features, _ = random_features(seed=4, num_train=200, num_test=50)
    whole_predictions, whole_scores = evaluation.knn_classify(train_features, train_labels, test_features, k=20)
    chunked_predictions, chunked_scores = evaluation.knn_classify(
        train_features, train_labels, test_features, k=20, test_chunk_size=7, train_chunk_size=13
    )
    np.testing.assert_array_equal(chunked_predictions, whole_predictions)
    np.testing.assert_allclose(chunked_scores, whole_scores, rtol=1e-5, atol=1e-7)


def test_knn_rejects_bad_arguments():
    train_features, train_labels, test_features, _ = random_features(seed=5)
    with pytest.raises(ValueError, match="temperature"):
        evaluation.knn_classify(train_features, train_labels, test_features, temperature=0)
    with pytest.raises(ValueError, match="train_labels must be >= 0"):
        evaluation.knn_classify(train_features, np.full_like(train_labels, -1), test_features)


def test_knn_on_separable_features_gives_the_accuracy_counted_by_hand():
    # Three classes, ten training points each, close to three orthogonal axes: a test point near
    # axis c has the ten points of class c as its nearest neighbours, and they outvote all others.
    generator = np.random.default_rng(7)
    axes = np.eye(3, 8, dtype=np.float32)
    train_labels = np.repeat(np.arange(3), 10)
    train_features = 5.0 * axes[train_labels] + generator.normal(scale=0.1, size=[30, 8]).astype(np.float32)
    test_features = 5.0 * axes[[0, 0, 1, 1, 2, 2]] + generator.normal(scale=0.1, size=[6, 8]).astype(np.float32)
    test_labels = np.array([0, 0, 1, 1, 2, 0])  # the last point lies on axis 2 but is labelled 0
    for k in (10, 30):  # 30: every training point votes
        predictions, scores = evaluation.knn_classify(train_features, train_labels, test_features, k, 0.1, 3)
        np.testing.assert_array_equal(predictions, [0, 0, 1, 1, 2, 2])
        assert evaluation.top_k_accuracy(scores, test_labels, 1) == 5 / 6
        # Vote shares: with k = 10 only class c votes; with k = 30 the other classes' 20 points add
        # weights exp((s - 1) / T) with s ~ 0, i.e. about 2 x 10 x e^-10 of class c's.
        own_share = scores[np.arange(6), predictions]
        if k == 10:
            np.testing.assert_array_equal(own_share, 1.0)
        else:
            assert np.all(own_share > 0.999) and np.all(own_share < 1.0)


def test_top_k_accuracy_by_hand():
    scores = np.array(
        [
            [0.1, 0.5, 0.3, 0.1],  # ranking 1, 2, (0, 3)
            [0.9, 0.0, 0.05, 0.05],  # ranking 0, (2, 3), 1
            [0.2, 0.2, 0.5, 0.1],  # ranking 2, (0, 1), 3
        ]
    )
    labels = np.array([2, 3, 0])
    assert evaluation.top_k_accuracy(scores, labels, 1) == 0.0
    # Row 0: 2 is second. Row 1: 3 ties with 2 and loses to the lower index. Row 2: 0 wins its tie.
    assert evaluation.top_k_accuracy(scores, labels, 2) == pytest.approx(2 / 3)
    assert evaluation.top_k_accuracy(scores, labels, 3) == 1.0
    assert evaluation.top_k_accuracy(scores, labels, 10) == 1.0


# --------------------------------------------------------------------------------------
# Linear evaluation
# --------------------------------------------------------------------------------------


def separable_features(generator, count, centres):
    labels = generator.integers(0, len(centres), size=count)
    return (centres[labels] + generator.normal(scale=0.3, size=[count, centres.shape[1]])).astype(np.float32), labels


def test_linear_evaluation_separates_linearly_separable_features():
    generator = np.random.default_rng(0)
    centres = 3.0 * generator.normal(size=[4, 12])
    train_features, train_labels = separable_features(generator, 400, centres)
    test_features, test_labels = separable_features(generator, 200, centres)
    result = evaluation.linear_evaluation(
        train_features, train_labels, test_features, test_labels, 4, epochs=20, batch_size=64
    )
    assert result.top1 >= 0.99 and result.top5 == 1.0
    assert result.train_top1 >= 0.99
    assert result.scores.shape == (200, 4)


def test_linear_evaluation_on_random_labels_stays_near_chance():
    train_features, train_labels, test_features, test_labels = random_features(
        seed=6, num_train=400, num_test=1000, num_classes=4
    )
    result = evaluation.linear_evaluation(
        train_features, train_labels, test_features, test_labels, 4, epochs=20, batch_size=64
    )
    # Chance is 0.25; the standard error over 1000 test examples is about 0.014.
    assert 0.18 < result.top1 < 0.32


def test_linear_evaluation_takes_new_features_every_epoch():
    generator = np.random.default_rng(1)
    centres = 3.0 * generator.normal(size=[3, 8])
    train_features, train_labels = separable_features(generator, 150, centres)
    test_features, test_labels = separable_features(generator, 60, centres)
    epochs_asked = []

    def features_of_epoch(epoch):
        epochs_asked.append(epoch)
        noise = np.random.default_rng(epoch).normal(scale=0.1, size=train_features.shape)
        return train_features + noise.astype(np.float32)

    result = evaluation.linear_evaluation(
        features_of_epoch, train_labels, test_features, test_labels, 3, epochs=4, batch_size=32
    )
    assert epochs_asked == [0, 1, 2, 3]
    assert result.top1 >= 0.95


def test_finetune_trains_a_copy_of_the_encoder():
    import keras

    inputs = keras.Input(shape=(None, None, 3))
    features = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    features = keras.layers.BatchNormalization()(features)
    encoder = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(features)))
    weights_before = [weight.copy() for weight in encoder.get_weights()]
    generator = np.random.default_rng(0)
    images = generator.integers(0, 256, size=[40, 16, 16, 3]).astype(np.uint8)
    labels = np.arange(40) % 2
    # Class 1 is brighter, so even this encoder can learn it.
    images[labels == 1] = np.minimum(images[labels == 1].astype(int) + 100, 255).astype(np.uint8)
    train_examples = tf.data.Dataset.from_tensor_slices((images[:30], labels[:30]))
    test_batches = tf.data.Dataset.from_tensor_slices((images[30:], labels[30:])).batch(4)

    result, classifier = evaluation.finetune(
        encoder, train_examples, 30, test_batches, 2, image_size=16, epochs=2, batch_size=16, learning_rate=0.1
    )
    assert result.scores.shape == (10, 2) and result.top5 == 1.0
    # The scores are the returned classifier's logits of the test images (divided by 255, the
    # default preprocessing), in inference mode; top-1 is their accuracy.
    logits = classifier(images[30:].astype(np.float32) / 255.0, training=False).numpy()
    np.testing.assert_allclose(result.scores, logits, atol=1e-5)
    assert result.top1 == np.mean(np.argmax(logits, axis=1) == labels[30:])
    assert not np.allclose(logits, 0.0)  # trained: the zero-initialised head has moved
    assert int(classifier.optimizer.iterations.numpy()) == 2 * 2  # ceil(30 / 16) full batches per epoch
    for before, after in zip(weights_before, encoder.get_weights()):
        np.testing.assert_array_equal(before, after)


# --------------------------------------------------------------------------------------
# Label subsets, augmentation, exported encoders
# --------------------------------------------------------------------------------------


def test_label_fraction_subset_is_class_balanced_and_seeded():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 7 + [3] * 1 + [-1] * 20)
    np.random.default_rng(0).shuffle(labels)
    subset = evaluation.label_fraction_subset(labels, 0.1, seed=0)

    # round(0.1 n), at least 1: 5 of 50, 3 of 30, 1 of 7 (0.7), 1 of 1 (0.1); never an unlabelled one.
    assert np.bincount(labels[subset]).tolist() == [5, 3, 1, 1]
    assert np.all(np.diff(subset) > 0)
    np.testing.assert_array_equal(subset, evaluation.label_fraction_subset(labels, 0.1, seed=0))
    assert not np.array_equal(subset, evaluation.label_fraction_subset(labels, 0.1, seed=1))
    everything = evaluation.label_fraction_subset(labels, 1.0, seed=0)
    np.testing.assert_array_equal(everything, np.flatnonzero(labels >= 0))
    for fraction in (0.0, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            evaluation.label_fraction_subset(labels, fraction)


def test_select_examples_and_labels_keep_dataset_order():
    examples = tf.data.Dataset.from_tensor_slices((np.arange(10) * 10, np.arange(10) % 3))
    np.testing.assert_array_equal(evaluation.example_labels(examples), np.arange(10) % 3)
    selected = list(evaluation.select_examples(examples, [1, 4, 9], 10).as_numpy_iterator())
    assert [(int(value), int(label)) for value, label in selected] == [(10, 1), (40, 1), (90, 0)]


def test_random_crop_and_flip_is_seeded_and_in_range():
    images = tf.constant(np.random.default_rng(0).integers(0, 256, size=[4, 20, 20, 3]), tf.uint8)
    views = evaluation.random_crop_and_flip(images, 16, tf.constant([1, 2]))
    assert views.shape == (4, 16, 16, 3)
    assert float(tf.reduce_min(views)) >= 0.0 and float(tf.reduce_max(views)) <= 1.0
    np.testing.assert_array_equal(views, evaluation.random_crop_and_flip(images, 16, tf.constant([1, 2])))
    assert not np.array_equal(views, evaluation.random_crop_and_flip(images, 16, tf.constant([1, 3])))


def test_augmented_feature_epochs_draw_new_views_each_epoch():
    images = np.random.default_rng(0).integers(0, 256, size=[6, 20, 20, 3]).astype(np.uint8)
    examples = tf.data.Dataset.from_tensor_slices((images, np.arange(6)))

    def top_left_pixels(batch):  # [B, 20, 20, 3] uint8 -> [B, 12]
        return tf.reshape(tf.cast(batch[:, :2, :2, :], tf.float32), [-1, 12])

    features_of_epoch = evaluation.augmented_feature_epochs(top_left_pixels, examples, 6, 20, batch_size=4, seed=3)
    first = features_of_epoch(0)
    assert first.shape == (6, 12)
    np.testing.assert_array_equal(first, features_of_epoch(0))
    assert not np.array_equal(first, features_of_epoch(1))


class MeanColourEncoder(tf.Module):
    """A stand-in exported encoder: h = per-channel mean and standard deviation of the image."""

    @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.uint8, name="images")])
    def serve(self, images):
        pixels = tf.reshape(tf.cast(images, tf.float32) / 255.0, [-1, 32 * 32, 3])
        embeddings = tf.concat([tf.reduce_mean(pixels, axis=1), tf.math.reduce_std(pixels, axis=1)], axis=1)
        return {"embeddings": embeddings, "projections": tf.math.l2_normalize(embeddings, axis=1)}


@pytest.fixture(scope="module")
def exported_encoder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("export") / "1")
    module = MeanColourEncoder()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    return path


def test_feature_function_from_saved_model_calls_serving_default(exported_encoder):
    features, image_size = evaluation.feature_function_from_saved_model(exported_encoder)
    assert image_size == 32
    images = np.random.default_rng(0).integers(0, 256, size=[3, 32, 32, 3]).astype(np.uint8)
    np.testing.assert_allclose(
        features(images)[:, :3], images.reshape(3, -1, 3).mean(axis=1) / 255.0, rtol=1e-5
    )


# --------------------------------------------------------------------------------------
# EvalConfig: the flags' settings and their problems, without TensorFlow
# --------------------------------------------------------------------------------------


def test_eval_config_fields_are_the_flags_with_their_defaults():
    flag_values = absl_flags.FlagValues()
    evaluate.define_flags(flag_values)
    flag_values(["simclr_keras.evaluate"])
    config = EvalConfig()
    for name in ("protocol", "dataset", "knn_k", "knn_temperature", "eval_batch_size", "label_fraction", "head_layer"):
        assert flag_values[name].value == getattr(config, name), name
    assert (config.protocol, config.knn_k, config.knn_temperature, config.eval_batch_size) == ("linear", 200, 0.1, 500)
    assert flag_values["knn_k"].help == "kNN: number of neighbours."  # the help is the field's
    # linear_augment and standardize_features follow linear_protocol unless given.
    assert (config.resolved().linear_augment, config.resolved().standardize_features) == (False, True)
    official = EvalConfig(linear_protocol="official").resolved()
    assert (official.linear_augment, official.standardize_features) == (True, False)
    assert EvalConfig(linear_protocol="official", protocol="knn").resolved().linear_augment is False
    assert EvalConfig(linear_protocol="official", standardize_features=True).resolved().standardize_features is True


def test_eval_config_protocol_defaults_follow_the_papers():
    assert EvalConfig(protocol="linear").protocol_defaults() == (100, 512, 0.1)
    assert EvalConfig(protocol="finetune", label_fraction=0.01).protocol_defaults() == (60, 256, 0.05)
    assert EvalConfig(protocol="finetune", label_fraction=0.1).protocol_defaults() == (30, 256, 0.05)
    assert EvalConfig(protocol="linear", epochs=3, batch_size=64, learning_rate=0.2).protocol_defaults() == (3, 64, 0.2)


CONFIG_PROBLEMS = [
    (dict(protocol="svm"), "protocol must be one of knn, linear, finetune, got 'svm'."),
    (dict(model_dir=None), "pass exactly one of encoder=EXPORT_DIR/<version> and model_dir=RUN, got neither."),
    (dict(encoder="E/1"), "pass exactly one of encoder=EXPORT_DIR/<version> and model_dir=RUN, got encoder=E/1 and model_dir=RUN."),
    (dict(model_dir=None, encoder="E/1", random_init=True), "random_init rebuilds the architecture of a model_dir run"),
    (dict(label_fraction=0.0), "label_fraction must be in (0, 1], got 0.0."),
    (dict(label_fraction=1.5), "label_fraction must be in (0, 1], got 1.5."),
    (dict(knn_k=0), "knn_k must be >= 1, got 0."),
    (dict(knn_temperature=0.0), "knn_temperature must be > 0, got 0.0."),
    (dict(epochs=-1), "epochs must be >= 0, got -1."),
    (dict(seed=-2), "seed must be >= 0, got -2."),
    (dict(momentum=1.0), "momentum must be in [0, 1), got 1.0."),
    (dict(image_size=4), "image_size must be >= 8, got 4."),
    (dict(eval_batch_size=0), "eval_batch_size must be >= 1, got 0."),
    (dict(protocol="knn", linear_augment=True), "linear_augment applies to protocol=linear, got protocol=knn."),
    (dict(linear_protocol="paper"), "linear_protocol must be one of features, official, hcl_dcl, got 'paper'."),
    (dict(head_layer=-1), "head_layer must be >= 0 (0: h, K: the projection head's K-th layer), got -1."),
    (dict(knn_k="3"), "knn_k must be an integer, got '3'."),
]


@pytest.mark.parametrize("changes, message", CONFIG_PROBLEMS, ids=[message[:30] for _, message in CONFIG_PROBLEMS])
def test_eval_config_validate_names_the_field_the_value_and_what_is_valid(changes, message):
    config = EvalConfig(model_dir="RUN").replace(**changes)
    problems = config.validate()
    assert len(problems) == 1 and problems[0].startswith(message), problems
    with pytest.raises(EvaluationError, match=re.escape(message)):
        evaluate_encoder(config)  # the library refuses it before loading anything


def test_eval_config_validate_lists_every_problem():
    assert EvalConfig(model_dir="RUN").validate() == []
    problems = EvalConfig(model_dir="RUN", knn_k=0, momentum=2.0, head_layer=-1).validate()
    assert [problem.split()[0] for problem in problems] == ["knn_k", "momentum", "head_layer"]


# --------------------------------------------------------------------------------------
# The command line's flag errors, in this process
# --------------------------------------------------------------------------------------


def parse_evaluate_flags(*flags):
    """evaluate's flags parsed into their own FlagValues (absl's global one holds simclr_keras.train's)."""
    flag_values = absl_flags.FlagValues()
    evaluate.define_flags(flag_values)
    return flag_values(["simclr_keras.evaluate", *flags]), flag_values


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


BAD_FLAGS = [
    (["--protocol=svm", "--model_dir=RUN"], "error: --protocol must be one of knn, linear, finetune, got 'svm'."),
    (["--label_fraction=0", "--model_dir=RUN"], "error: --label_fraction must be in (0, 1], got 0.0."),
    (["--label_fraction=1.5", "--model_dir=RUN"], "error: --label_fraction must be in (0, 1], got 1.5."),
    ([], "error: pass exactly one of --encoder=EXPORT_DIR/<version> and --model_dir=RUN, got neither."),
    (["--encoder=EXPORT/1", "--model_dir=RUN"], "error: pass exactly one of --encoder=EXPORT_DIR/<version> and "
     "--model_dir=RUN, got --encoder=EXPORT/1 and --model_dir=RUN."),
    (["--encoder=E/1", "--random_init"], "error: --random_init rebuilds the architecture of a --model_dir run; it "
     "cannot be used with --encoder=E/1."),
    (["--model_dir=RUN", "--protocol=knn", "--linear_augment"], "error: --linear_augment applies to "
     "--protocol=linear, got --protocol=knn."),
    (["--model_dir=RUN", "--linear_protocol=paper"], "error: --linear_protocol must be one of features, official, hcl_dcl, "
     "got 'paper'."),
]  # fmt: skip


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(flags) or "none" for flags, _ in BAD_FLAGS])
def test_flag_errors_end_in_one_line_and_exit_status_2(capsys, flags, message):
    argv, flag_values = parse_evaluate_flags(*flags)
    with pytest.raises(SystemExit) as exit:
        evaluate.main(argv, flag_values)
    assert exit.value.code == 2
    assert error_lines(capsys.readouterr().err) == [message]


def test_several_flag_errors_are_all_named(capsys):
    status, _, stderr = run_evaluate_main(capsys, "--model_dir=RUN", "--knn_k=0", "--eval_batch_size=0")
    assert status == 2
    assert error_lines(stderr) == ["error: --knn_k must be >= 1, got 0.", "error: --eval_batch_size must be >= 1, got 0."]


def test_errors_found_while_evaluating_end_in_one_line_and_exit_status_1(capsys, cifar_100_images, tmp_path):
    for flags, message in [
        (["--encoder=/no/such/export", f"--dataset=folder:{cifar_100_images}"],
         "error: --encoder=/no/such/export: /no/such/export is neither a SavedModel"),
        # The data folder is checked before the encoder loads.
        (["--encoder=/no/such/export", f"--dataset=folder:{tmp_path}/none"],
         f"error: --dataset=folder:{tmp_path}/none: no train/ folder there"),
        ([f"--model_dir={tmp_path}", f"--dataset=folder:{cifar_100_images}"],
         f"error: --model_dir={tmp_path}: {tmp_path} is not a training run: model_config.json is missing."),
    ]:  # fmt: skip
        status, _, stderr = run_evaluate_main(capsys, "--protocol=knn", *flags)
        assert status == 1, (flags, stderr[-2000:])
        [line] = error_lines(stderr)
        assert line.startswith(message), line
        assert "Traceback" not in stderr


# --------------------------------------------------------------------------------------
# A tiny trained run, its export, and Encoder
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(cifar10_500, tmp_path_factory):
    """Two training steps of a width-0.125 ResNet-18 on 500 CIFAR-10 images: (data folder, model_dir)."""
    model_dir = str(tmp_path_factory.mktemp("tiny_run"))
    status, _, stderr = run_train_main(
        f"--dataset=folder:{cifar10_500}", f"--model_dir={model_dir}", "--train_steps=2", "--batch_size=64",
        "--width_multiplier=0.125", "--eval_split=",
    )  # fmt: skip
    assert status == 0, stderr[-3000:]
    return cifar10_500, model_dir


@pytest.fixture(scope="module")
def export_of_tiny_run(tiny_run, tmp_path_factory):
    return export.export_encoder(runs.load_model(tiny_run[1]), str(tmp_path_factory.mktemp("exports")))


def folder_images(root, split):
    """uint8 [N, 32, 32, 3] images and int64 [N] labels of a CIFAR-10 folder, decoded by tf.io, in class order."""
    classes = sorted(os.listdir(os.path.join(root, split)))
    images, labels = [], []
    for label, name in enumerate(classes):
        for file_name in sorted(os.listdir(os.path.join(root, split, name))):
            images.append(tf.io.decode_jpeg(tf.io.read_file(os.path.join(root, split, name, file_name))).numpy())
            labels.append(label)
    return np.stack(images), np.array(labels)


def test_encoder_from_run_dir_and_from_export_give_the_models_inference_mode_features(tiny_run, export_of_tiny_run):
    data_dir, model_dir = tiny_run
    model = runs.load_model(model_dir)
    images, _ = folder_images(data_dir, "test")
    # 40 x 48 images: the evaluation preprocessing must centre-crop and resize them to 32 px.
    images = tf.cast(tf.round(tf.image.resize(images[::10], (40, 48))), tf.uint8).numpy()
    views = official_center_crop(images, 32, crop_proportion=1.0)  # the run's eval crop at 32 px keeps the side
    expected = model.encoder(views, training=False).numpy()  # BatchNorm on its moving statistics
    assert not np.allclose(expected, model.encoder(views, training=True).numpy(), atol=1e-3)  # modes differ here

    from_run, from_export = Encoder.from_run_dir(model_dir), Encoder.from_export(export_of_tiny_run)
    for encoder in (from_run, from_export):
        np.testing.assert_allclose(np.asarray(encoder.features(images)), expected, atol=1e-4)
        assert encoder.image_size == 32 and encoder.input_size is None and encoder.backbone is not None
    assert from_run.source == model_dir and from_run.checkpoint.endswith("ckpt-2")
    assert from_run.class_names == tuple(sorted(os.listdir(os.path.join(data_dir, "train"))))
    assert from_export.source == export_of_tiny_run and from_export.checkpoint is None
    # Head layer 1: the export has no head_layer_1 output, so its rebuilt head gives it.
    head_expected = hand_head_forward(model.projection_head, expected, 1)
    for encoder in (Encoder.from_run_dir(model_dir, head_layer=1), Encoder.from_export(export_of_tiny_run, 1)):
        np.testing.assert_allclose(np.asarray(encoder.features(images)), head_expected, atol=1e-4)
    with pytest.raises(ValueError, match=r"head_layer must be an integer in \[0, 2\].*head_layer=9"):
        Encoder.from_run_dir(model_dir, head_layer=9)


def test_random_init_encoder_is_the_runs_architecture_seeded_and_untrained(tiny_run):
    _, model_dir = tiny_run
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)

    def random_features(seed):
        keras.utils.set_random_seed(seed)
        encoder = Encoder.from_run_dir(model_dir, random_init=True)
        assert encoder.random_init and encoder.checkpoint is None
        return np.asarray(encoder.features(images))

    first = random_features(3)
    np.testing.assert_array_equal(first, random_features(3))
    assert not np.allclose(first, random_features(4))
    trained = np.asarray(Encoder.from_run_dir(model_dir).features(images))
    assert first.shape == trained.shape and not np.allclose(first, trained)


class FloatInputEncoder(tf.Module):
    """A SavedModel whose `images` are float32 in [0, 1]: evaluation's uint8 images would be misread."""

    @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32, name="images")])
    def serve(self, images):
        return {"embeddings": tf.reduce_mean(images, axis=[1, 2])}


def test_encoder_from_a_foreign_export_uses_its_signature_and_cannot_fine_tune(
    exported_encoder, cifar_100_images, tmp_path, capsys
):
    encoder = Encoder.from_export(exported_encoder)  # MeanColourEncoder: fixed 32 px, no Keras configs
    assert (encoder.image_size, encoder.input_size, encoder.backbone) == (32, 32, None)
    assert "not written by simclr_keras.export_encoder" in encoder.rebuild_error
    images = np.random.default_rng(1).integers(0, 256, size=[2, 32, 32, 3]).astype(np.uint8)
    np.testing.assert_allclose(
        np.asarray(encoder.features(images))[:, :3], images.reshape(2, -1, 3).mean(axis=1) / 255.0, rtol=1e-5
    )
    config = EvalConfig(encoder=exported_encoder, dataset=f"folder:{cifar_100_images}", protocol="finetune")
    with pytest.raises(EvaluationError, match="protocol=finetune needs trainable weights, and encoder="):
        evaluate_encoder(config)
    with pytest.raises(EvaluationError, match="image_size=64 differs from the 32 px the exported encoder takes"):
        evaluate_encoder(config.replace(protocol="knn", image_size=64))

    float_export = str(tmp_path / "float_export" / "1")
    module = FloatInputEncoder()
    tf.saved_model.save(module, float_export, signatures={"serving_default": module.serve})
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    (not_a_model / "weights.h5").write_bytes(b"")
    for path, message in [
        (float_export, "serving_default takes `images` as float32 (None, 32, 32, 3), but evaluation feeds uint8"),
        (str(not_a_model), "is neither a SavedModel"),
    ]:
        status, _, stderr = run_evaluate_main(
            capsys, f"--encoder={path}", "--protocol=knn", f"--dataset=folder:{cifar_100_images}"
        )
        assert status == 1
        [line] = error_lines(stderr)
        assert line.startswith(f"error: --encoder={path}: ") and message in line, line


# --------------------------------------------------------------------------------------
# Evaluations of the tiny run
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def knn_of_tiny_run(tiny_run, tmp_path_factory):
    """The command line's one end-to-end run: kNN of the tiny run, in a subprocess. (results, stdout)."""
    data_dir, model_dir = tiny_run
    output = tmp_path_factory.mktemp("knn") / "knn.json"
    result = subprocess.run(
        [sys.executable, "-m", "simclr_keras.evaluate", "--protocol=knn", f"--model_dir={model_dir}",
         f"--dataset=folder:{data_dir}", f"--output={output}", "--eval_batch_size=250"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with open(output, encoding="utf-8") as file:
        return json.load(file), result.stdout


def test_cli_knn_gives_the_accuracy_of_knn_on_the_models_own_features(tiny_run, knn_of_tiny_run):
    data_dir, model_dir = tiny_run
    results, stdout = knn_of_tiny_run
    assert f"knn (k=200, T=0.1) of {model_dir} on folder:{data_dir}:test: top-1 {results['top1']:.4f}, " in stdout
    assert "(500 train, 100 test images, 10 classes)" in stdout
    assert (results["protocol"], results["num_train"], results["num_test"], results["num_classes"]) == ("knn", 500, 100, 10)
    assert results["knn_k"] == 200 and results["knn_temperature"] == 0.1 and results["image_size"] == 32
    assert results["checkpoint"].endswith("ckpt-2") and results["random_init"] is False
    # An independent reading: images decoded by tf.io, the Keras encoder in inference mode (the
    # 32 px eval crop is the whole image), the InstDisc vote written out in numpy.
    model = runs.load_model(model_dir)
    (train_images, train_labels), (test_images, test_labels) = folder_images(data_dir, "train"), folder_images(data_dir, "test")
    features = [model.encoder(images.astype(np.float32) / 255.0, training=False).numpy() for images in (train_images, test_images)]
    scores = reference_knn_scores(features[0], train_labels, features[1], 200, 0.1, 10)
    # One test image in 100 may flip on float rounding of near-equal votes.
    assert results["top1"] == pytest.approx(np.mean(np.argmax(scores, axis=1) == test_labels), abs=0.011)
    assert results["top5"] == pytest.approx(evaluation.top_k_accuracy(scores, test_labels, 5), abs=0.011)


def test_evaluate_encoder_of_the_export_gives_the_runs_knn_accuracy(tiny_run, export_of_tiny_run, knn_of_tiny_run):
    results, _ = knn_of_tiny_run
    config = EvalConfig(encoder=export_of_tiny_run, protocol="knn", dataset=f"folder:{tiny_run[0]}", eval_batch_size=250)
    from_export = evaluate_encoder(config)
    assert from_export.results["encoder"] == export_of_tiny_run and from_export.results["image_size"] == 32
    assert "checkpoint" not in from_export.results and from_export.num_train == 500
    # The same encoder and preprocessing as the run's: the same votes, up to float rounding.
    assert from_export.top1 == pytest.approx(results["top1"], abs=0.011)
    assert from_export.top5 == pytest.approx(results["top5"], abs=0.011)
    assert from_export.summary.startswith(f"knn (k=200, T=0.1) of {export_of_tiny_run} on folder:")


def labels_in_evaluation_order(data_dir, split):
    _, labels, _ = data.list_image_folder(data_dir, split)
    return np.array(labels)


def test_finetune_on_a_tenth_of_the_labels_writes_its_results_and_confusion_matrix(tiny_run, tmp_path):
    data_dir, model_dir = tiny_run
    output = tmp_path / "finetune.json"
    result = evaluate_encoder(
        EvalConfig(model_dir=model_dir, dataset=f"folder:{data_dir}", protocol="finetune", epochs=1,
                   label_fraction=0.1, output=str(output), eval_batch_size=250)
    )  # fmt: skip
    results = json.loads(output.read_text())
    # 5 of the 50 images of each class; the default batch of 256 shrinks to the 50 images.
    assert results["num_train"] == 50 and results["batch_size"] == 50 and results["epochs"] == 1
    assert results["learning_rate"] == pytest.approx(0.05 * 50 / 256)
    assert results["top1"] == result.top1 == np.mean(np.argmax(result.scores, axis=1) == labels_in_evaluation_order(data_dir, "test"))
    # Beside --output, by default: the confusion matrix of the 100 test images.
    image = read_png(tmp_path / "finetune_confusion.png")
    assert image.shape[0] >= 400 and image.shape[1] >= 400, image.shape
    assert result.confusion_matrix == str(tmp_path / "finetune_confusion.png")


def test_confusion_matrix_flag_replaces_the_default_path(tiny_run, tmp_path, capsys):
    data_dir, model_dir = tiny_run
    picture = tmp_path / "pictures" / "knn.png"
    status, stdout, _ = run_evaluate_main(
        capsys, f"--model_dir={model_dir}", f"--dataset=folder:{data_dir}", f"--output={tmp_path / 'knn.json'}",
        "--protocol=knn", "--knn_k=10", "--max_train_examples=100", f"--confusion_matrix={picture}",
    )  # fmt: skip
    assert status == 0 and "knn (k=10, T=0.1) of " in stdout and "(100 train, 100 test images, 10 classes)" in stdout
    read_png(picture)
    assert not os.path.exists(tmp_path / "knn_confusion.png")


def test_linear_with_augmentation_on_half_the_labels(tiny_run):
    data_dir, model_dir = tiny_run
    result = evaluate_encoder(
        EvalConfig(model_dir=model_dir, dataset=f"folder:{data_dir}", protocol="linear", epochs=2,
                   linear_augment=True, label_fraction=0.5, eval_batch_size=250)
    )  # fmt: skip
    results = result.results
    # The default batch of 512 is capped at the 250 images, and the rate scaled by the batch used.
    assert results["num_train"] == 250 and results["batch_size"] == 250 and results["linear_augment"] is True
    assert results["learning_rate"] == pytest.approx(0.1 * 250 / 256)
    assert results["linear_protocol"].startswith("custom") and results["standardize_features"] is True
    assert result.top1 == np.mean(np.argmax(result.scores, axis=1) == result.test_labels)


def test_random_init_linear_evaluation_on_cached_features(tiny_run):
    data_dir, model_dir = tiny_run
    result = evaluate_encoder(
        EvalConfig(model_dir=model_dir, dataset=f"folder:{data_dir}", protocol="linear", random_init=True,
                   epochs=3, batch_size=64, max_train_examples=200)
    )  # fmt: skip
    results = result.results
    assert results["random_init"] is True and results["checkpoint"] is None and results["linear_augment"] is False
    assert results["num_train"] == 200 and results["epochs"] == 3 and results["batch_size"] == 64
    assert results["learning_rate"] == pytest.approx(0.1 * 64 / 256) and results["standardize_features"] is True
    assert result.summary.startswith(f"linear[features] (3 epochs, batch 64, lr 0.025) of random-init {model_dir} on ")


def test_finetunes_an_exported_encoder(tiny_run, export_of_tiny_run):
    export_dir = os.path.dirname(export_of_tiny_run)  # EXPORT_DIR stands for its highest version
    result = evaluate_encoder(
        EvalConfig(encoder=export_dir, dataset=f"folder:{tiny_run[0]}", protocol="finetune", epochs=1,
                   label_fraction=0.1, eval_batch_size=250)
    )  # fmt: skip
    assert result.results["encoder"] == export_of_tiny_run
    assert result.num_train == 50 and result.results["image_size"] == 32
    assert result.top1 == np.mean(np.argmax(result.scores, axis=1) == labels_in_evaluation_order(tiny_run[0], "test"))


def test_linear_protocol_official_is_named_in_the_json_and_the_printed_line(tiny_run, tmp_path, capsys):
    # The official protocol: raw features (no standardisation) of crop-and-flip views, new each epoch.
    data_dir, model_dir = tiny_run
    for protocol, augment, standardize in (("official", True, False), ("features", False, True)):
        output = tmp_path / f"{protocol}.json"
        status, stdout, stderr = run_evaluate_main(
            capsys, f"--model_dir={model_dir}", f"--dataset=folder:{data_dir}", f"--output={output}",
            "--eval_batch_size=250", "--protocol=linear", f"--linear_protocol={protocol}", "--epochs=1",
            "--label_fraction=0.2",
        )  # fmt: skip
        assert status == 0, stderr[-3000:]
        results = json.loads(output.read_text())
        assert results["linear_protocol"] == protocol
        assert (results["linear_augment"], results["standardize_features"]) == (augment, standardize)
        assert f"linear[{protocol}] (1 epochs, batch 100, lr 0.0390625) of {model_dir} on " in stdout


def test_linear_protocol_hcl_dcl_on_the_command_line_at_another_view_size(tiny_run, export_of_tiny_run, tmp_path, capsys):
    # linear.py's settings in the JSON; the test views at 48 px from a run trained at 32; an export rebuilds too.
    data_dir, model_dir = tiny_run
    for source in (f"--model_dir={model_dir}", f"--encoder={export_of_tiny_run}"):
        output = tmp_path / "hcl_dcl.json"
        status, stdout, stderr = run_evaluate_main(
            capsys, source, f"--dataset=folder:{data_dir}", f"--output={output}", "--confusion_matrix=",
            "--protocol=linear", "--linear_protocol=hcl_dcl", "--epochs=1", "--label_fraction=0.2", "--image_size=48",
        )  # fmt: skip
        assert status == 0, stderr[-3000:]
        results = json.loads(output.read_text())
        assert (results["linear_protocol"], results["optimizer"], results["weight_decay"]) == ("hcl_dcl", "adam", 1e-6)
        assert (results["learning_rate"], results["batch_size"], results["image_size"]) == (1e-3, 100, 48)
        assert results["train_view_size"] == 32 and 0 <= results["top1"] <= 1
        assert "linear[hcl_dcl] (1 epochs, batch 100, Adam lr 0.001) of " in stdout


def test_knn_on_a_head_layer(tiny_run, tmp_path, capsys):
    data_dir, model_dir = tiny_run
    status, stdout, _ = run_evaluate_main(
        capsys, f"--model_dir={model_dir}", f"--dataset=folder:{data_dir}", "--protocol=knn", "--head_layer=1",
        f"--output={tmp_path / 'head.json'}", "--confusion_matrix=",
    )  # fmt: skip
    assert status == 0 and json.loads((tmp_path / "head.json").read_text())["head_layer"] == 1
    assert " on head layer 1 of " in stdout and not os.path.exists(tmp_path / "head_confusion.png")
    status, _, stderr = run_evaluate_main(
        capsys, f"--model_dir={model_dir}", f"--dataset=folder:{data_dir}", "--protocol=knn", "--head_layer=9"
    )
    assert status == 1
    assert error_lines(stderr) == [
        "error: --head_layer must be an integer in [0, 2] (0: h, 2: z), received --head_layer=9."
    ]


def test_strict_data_turns_a_bad_file_into_a_one_line_error(bad_folder_run, capsys):
    root, model_dir, _ = bad_folder_run
    status, _, stderr = run_evaluate_main(
        capsys, f"--dataset=folder:{root}", "--strict_data", f"--model_dir={model_dir}", "--protocol=knn"
    )
    assert status == 1
    [line] = error_lines(stderr)
    match = re.match(rf"error: --dataset=folder:{re.escape(root)}: \S+/train/cat/(\w+\.\w+) does not decode", line)
    assert match and match.group(1) in BAD_FILES, line
