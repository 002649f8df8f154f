"""Evaluation protocols: kNN against its definition, linear evaluation, label subsets, the CLI end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import read_png
from simclr_keras import evaluation


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
    assert result.scores.shape == (10, 2) and 0.0 <= result.top1 <= 1.0 and result.top5 == 1.0
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
# The command line on a tiny trained run
# --------------------------------------------------------------------------------------


def evaluate(*flags):
    return subprocess.run(
        [sys.executable, "-m", "simclr_keras.evaluate", *flags], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def tiny_run(cifar10_500, tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("tiny_run"))
    result = subprocess.run(
        [
            sys.executable, "-m", "simclr_keras.train", f"--dataset=folder:{cifar10_500}", f"--model_dir={model_dir}",
            "--train_steps=2", "--batch_size=64", "--width_multiplier=0.125", "--eval_split=",
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return cifar10_500, model_dir


def evaluate_to_json(data_dir, source_flag, output, *flags):
    result = evaluate(source_flag, f"--dataset=folder:{data_dir}", f"--output={output}", "--eval_batch_size=250", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(output, encoding="utf-8") as file:
        results = json.load(file)
    assert {"protocol", "top1", "top5", "num_train", "num_test", "num_classes", "seed", "label_fraction"} <= set(
        results
    )
    assert 0.0 <= results["top1"] <= results["top5"] <= 1.0
    assert results["num_test"] == 100 and results["num_classes"] == 10
    assert f"top-1 {results['top1']:.4f}, top-5 {results['top5']:.4f}" in result.stdout
    return results


@pytest.fixture(scope="module")
def knn_of_tiny_run(tiny_run, tmp_path_factory):
    data_dir, model_dir = tiny_run
    output = tmp_path_factory.mktemp("knn") / "knn.json"
    return evaluate_to_json(data_dir, f"--model_dir={model_dir}", output, "--protocol=knn")


def test_cli_knn(knn_of_tiny_run):
    results = knn_of_tiny_run
    assert results["protocol"] == "knn" and results["num_train"] == 500
    assert results["knn_k"] == 200 and results["knn_temperature"] == 0.1 and results["image_size"] == 32
    assert results["checkpoint"].endswith("ckpt-2") and results["random_init"] is False


def test_cli_finetune_on_a_tenth_of_the_labels(tiny_run, tmp_path):
    data_dir, model_dir = tiny_run
    results = evaluate_to_json(
        data_dir, f"--model_dir={model_dir}", tmp_path / "finetune.json", "--protocol=finetune", "--epochs=1",
        "--label_fraction=0.1",
    )  # fmt: skip
    # 5 of the 50 images of each class; the default batch of 256 shrinks to the 50 images.
    assert results["num_train"] == 50 and results["batch_size"] == 50 and results["epochs"] == 1
    assert results["learning_rate"] == pytest.approx(0.05 * 50 / 256)
    # Beside --output, by default: the confusion matrix of the 100 test images.
    image = read_png(tmp_path / "finetune_confusion.png")
    assert image.shape[0] >= 400 and image.shape[1] >= 400, image.shape


def test_cli_confusion_matrix_flag(tiny_run, tmp_path):
    data_dir, model_dir = tiny_run
    picture = tmp_path / "pictures" / "knn.png"
    evaluate_to_json(
        data_dir, f"--model_dir={model_dir}", tmp_path / "knn.json", "--protocol=knn", "--knn_k=10",
        "--max_train_examples=100", f"--confusion_matrix={picture}",
    )  # fmt: skip
    read_png(picture)
    assert not os.path.exists(tmp_path / "knn_confusion.png")  # the flag replaces the default path


def test_cli_linear_with_augmentation_on_half_the_labels(tiny_run, tmp_path):
    data_dir, model_dir = tiny_run
    results = evaluate_to_json(
        data_dir, f"--model_dir={model_dir}", tmp_path / "augmented.json", "--protocol=linear", "--epochs=2",
        "--linear_augment", "--label_fraction=0.5",
    )  # fmt: skip
    # The default batch of 512 is capped at the 250 images, and the rate scaled by the batch used.
    assert results["num_train"] == 250 and results["batch_size"] == 250 and results["linear_augment"] is True
    assert results["learning_rate"] == pytest.approx(0.1 * 250 / 256)


def test_cli_random_init(tiny_run, tmp_path):
    data_dir, model_dir = tiny_run
    # Linear evaluation on cached features of a random encoder, on the first 200 training images.
    results = evaluate_to_json(
        data_dir, f"--model_dir={model_dir}", tmp_path / "random.json", "--protocol=linear", "--random_init",
        "--epochs=3", "--batch_size=64", "--max_train_examples=200",
    )  # fmt: skip
    assert results["random_init"] is True and results["checkpoint"] is None and results["linear_augment"] is False
    assert results["num_train"] == 200 and results["epochs"] == 3 and results["batch_size"] == 64
    assert results["learning_rate"] == pytest.approx(0.1 * 64 / 256) and results["standardize_features"] is True


@pytest.fixture(scope="module")
def export_of_tiny_run(tiny_run, tmp_path_factory):
    from simclr_keras import export, runs

    return export.export_encoder(runs.load_model(tiny_run[1]), str(tmp_path_factory.mktemp("exports")))


def test_cli_exported_encoder_gives_the_runs_knn_accuracy(tiny_run, export_of_tiny_run, knn_of_tiny_run, tmp_path):
    # The signature takes any image size; the training size comes from the export's Keras configs.
    results = evaluate_to_json(tiny_run[0], f"--encoder={export_of_tiny_run}", tmp_path / "knn.json", "--protocol=knn")
    assert results["encoder"] == export_of_tiny_run and results["image_size"] == 32 and results["num_train"] == 500
    assert "checkpoint" not in results
    # The same encoder and preprocessing as the run's: the same votes, up to float rounding.
    assert results["top1"] == pytest.approx(knn_of_tiny_run["top1"], abs=0.011)
    assert results["top5"] == pytest.approx(knn_of_tiny_run["top5"], abs=0.011)


def test_cli_finetunes_an_exported_encoder(tiny_run, export_of_tiny_run, tmp_path):
    export_dir = os.path.dirname(export_of_tiny_run)  # EXPORT_DIR stands for its highest version
    results = evaluate_to_json(
        tiny_run[0], f"--encoder={export_dir}", tmp_path / "finetune.json", "--protocol=finetune", "--epochs=1",
        "--label_fraction=0.1",
    )  # fmt: skip
    assert results["encoder"] == export_of_tiny_run
    assert results["num_train"] == 50 and results["image_size"] == 32


BAD_FLAGS = [
    (["--protocol=svm", "--model_dir=RUN"], "error: --protocol must be one of knn, linear, finetune, got 'svm'."),
    (["--label_fraction=0", "--model_dir=RUN"], "error: --label_fraction must be in (0, 1], got 0.0."),
    (["--label_fraction=1.5", "--model_dir=RUN"], "error: --label_fraction must be in (0, 1], got 1.5."),
    ([], "error: pass exactly one of --encoder=EXPORT_DIR/<version> and --model_dir=RUN, got neither."),
    (["--encoder=EXPORT/1", "--model_dir=RUN"], "got --encoder=EXPORT/1 and --model_dir=RUN."),
    (["--encoder=/no/such/export", "--protocol=knn"], "error: --encoder=/no/such/export: "),
]


def test_bad_flags_end_in_one_line_without_traceback():
    # Started together: each command spends its two seconds importing TensorFlow.
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "simclr_keras.evaluate", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for flags, _ in BAD_FLAGS
    ]
    for process, (flags, message) in zip(processes, BAD_FLAGS):
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 1, (flags, stderr[-2000:])
        last_line = stderr.strip().splitlines()[-1]
        assert last_line.startswith("error: ") and message in last_line, (flags, last_line)
        assert "Traceback" not in stderr, flags


def test_cli_linear_protocol_official_is_named_in_the_json_and_the_printed_line(tiny_run, tmp_path):
    # The official protocol: raw features (no standardisation) of crop-and-flip views, new each epoch.
    data_dir, model_dir = tiny_run
    for protocol, augment, standardize in (("official", True, False), ("features", False, True)):
        output = tmp_path / f"{protocol}.json"
        result = evaluate(
            f"--model_dir={model_dir}", f"--dataset=folder:{data_dir}", f"--output={output}", "--eval_batch_size=250",
            "--protocol=linear", f"--linear_protocol={protocol}", "--epochs=1", "--label_fraction=0.2",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        results = json.loads(output.read_text())
        assert results["linear_protocol"] == protocol
        assert (results["linear_augment"], results["standardize_features"]) == (augment, standardize)
        assert f"linear[{protocol}] (1 epochs" in result.stdout
    result = evaluate(f"--model_dir={model_dir}", f"--dataset=folder:{data_dir}", "--linear_protocol=paper")
    assert result.returncode != 0 and "--linear_protocol must be one of features, official, got 'paper'" in result.stderr


def test_cli_knn_on_a_head_layer(tiny_run, tmp_path):
    data_dir, model_dir = tiny_run
    results = evaluate_to_json(data_dir, f"--model_dir={model_dir}", tmp_path / "head.json", "--protocol=knn", "--head_layer=1")
    assert results["head_layer"] == 1
    result = evaluate(f"--model_dir={model_dir}", f"--dataset=folder:{data_dir}", "--protocol=knn", "--head_layer=9")
    assert result.returncode != 0 and "--head_layer=9: head_layer must be an integer in [0, 2]" in result.stderr
