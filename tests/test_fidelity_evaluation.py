"""Evaluation as the official code does it (issue 12): the 87.5% centre crop above 32 px on every
evaluation path, SimCLR v2's projection-head layer features (`ft_proj_selector`), and the official
linear protocol named in every result. References are hand computations (numpy, tf.image)."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_keras import Encoder, EvalConfig, SimCLR, SimCLRAugmentation, eval_run, evaluation, export
from simclr_keras.heads import ProjectionHead
from simclr_keras.models.simclr import build_simclr

TOLERANCE = 1e-4


def official_center_crop(images, size, crop_proportion=0.875):
    """google-research/simclr tf2 data_util.center_crop for a square output, image by image."""
    views = []
    for image in images:
        height, width = image.shape[:2]
        side = int(np.rint(crop_proportion * min(height, width)))
        top, left = (height - side + 1) // 2, (width - side + 1) // 2
        crop = tf.cast(image[top : top + side, left : left + side], tf.float32)[None] / 255.0
        views.append(tf.image.resize(crop, [size, size], method="bicubic")[0])
    return tf.clip_by_value(tf.stack(views), 0.0, 1.0)


def randomise(head, seed=0):
    """Random kernels, biases and BatchNorm statistics, so that every term of the forward pass counts."""
    rng = np.random.default_rng(seed)
    for weight in head.weights:
        values = rng.normal(0.0, 0.5, weight.shape)
        if "variance" in weight.path or "gamma" in weight.path:
            values = rng.uniform(0.5, 2.0, weight.shape)
        weight.assign(values.astype(np.float32))


def hand_head_forward(head, features, head_layer):
    """The official ProjectionHead's hiddens_list[head_layer] in inference mode, written in numpy."""
    outputs = np.asarray(features, np.float64)
    for index in range(head_layer):
        dense, batch_norm = head.dense_layers[index], head.batch_norm_layers[index]
        outputs = outputs @ np.asarray(dense.kernel, np.float64)
        if dense.use_bias:
            outputs = outputs + np.asarray(dense.bias, np.float64)
        if batch_norm is not None:
            gamma = np.asarray(batch_norm.gamma, np.float64) if batch_norm.scale else 1.0
            beta = np.asarray(batch_norm.beta, np.float64) if batch_norm.center else 0.0
            mean = np.asarray(batch_norm.moving_mean, np.float64)
            variance = np.asarray(batch_norm.moving_variance, np.float64)
            outputs = gamma * (outputs - mean) / np.sqrt(variance + batch_norm.epsilon) + beta
        if index < head.num_layers - 1:
            outputs = np.maximum(outputs, 0.0)
    return outputs


@pytest.mark.parametrize("batch_norm", ["all", "none"])
def test_head_layer_k_is_the_output_of_the_heads_first_k_layers(batch_norm):
    head = ProjectionHead(num_layers=3, hidden_dim=6, output_dim=4, batch_norm=batch_norm)
    head.build((None, 5))
    randomise(head)
    features = np.random.default_rng(1).normal(size=(7, 5)).astype(np.float32)
    for head_layer, width in ((0, 5), (1, 6), (2, 6), (3, 4)):
        outputs = head(features, training=False, head_layer=head_layer).numpy()
        assert outputs.shape == (7, width)
        np.testing.assert_allclose(outputs, hand_head_forward(head, features, head_layer), atol=TOLERANCE)
    np.testing.assert_allclose(head(features, training=False).numpy(), hand_head_forward(head, features, 3), atol=TOLERANCE)
    with pytest.raises(ValueError, match=r"head_layer must be an integer in \[0, 3\].*head_layer=4"):
        head(features, head_layer=4)


@pytest.fixture(scope="module")
def model_above_32_pixels():
    keras.utils.set_random_seed(0)
    model = build_simclr(image_size=40, width_multiplier=0.125, proj_layers=3, proj_dim=8)
    model(np.zeros((1, 40, 40, 3), np.uint8))  # builds every weight
    randomise(model.projection_head)
    images = np.random.default_rng(2).integers(0, 256, (3, 48, 64, 3), dtype=np.uint8)
    views = official_center_crop(images, 40)
    embeddings = model.encoder(views, training=False).numpy()
    expected = {0: embeddings, 1: hand_head_forward(model.projection_head, embeddings, 1)}
    assert np.abs(embeddings).max() > 1e-3  # a zero representation would match trivially
    return model, images, expected


def test_features_of_a_model_use_the_official_center_crop_and_the_head_layer(model_above_32_pixels):
    model, images, expected = model_above_32_pixels
    for head_layer in (0, 1):
        features = evaluation.feature_function_from_model(model, head_layer)(images)
        np.testing.assert_allclose(features.numpy(), expected[head_layer], atol=TOLERANCE)


def test_export_signature_and_load_encoder_use_the_official_center_crop_and_the_head_layer(
    model_above_32_pixels, tmp_path
):
    model, images, expected = model_above_32_pixels
    version_dir = export.export_encoder(model, str(tmp_path / "exports"), head_layer=1)
    loaded = tf.saved_model.load(version_dir)
    outputs = loaded.signatures["serving_default"](images=tf.constant(images))
    np.testing.assert_allclose(outputs["embeddings"].numpy(), expected[0], atol=TOLERANCE)
    np.testing.assert_allclose(outputs["head_layer_1"].numpy(), expected[1], atol=TOLERANCE)
    function, _ = evaluation.feature_function_from_saved_model(version_dir, "head_layer_1")
    np.testing.assert_allclose(np.asarray(function(images)), expected[1], atol=TOLERANCE)
    for head_layer in (0, 1):
        rebuilt = export.load_encoder(version_dir, head_layer=head_layer)
        np.testing.assert_allclose(rebuilt(images, training=False).numpy(), expected[head_layer], atol=TOLERANCE)
    with pytest.raises(ValueError, match="head_layer=5"):
        export.export_encoder(model, str(tmp_path / "other"), head_layer=5)


def test_finetuning_from_a_head_layer_trains_its_first_layers_and_leaves_the_rest(model_above_32_pixels):
    model, images, _ = model_above_32_pixels
    head_before = [weight.numpy().copy() for weight in model.projection_head.weights]
    examples = tf.data.Dataset.from_tensor_slices((np.concatenate([images, images[::-1]]), np.array([0, 1, 0, 1, 0, 1])))
    batches = examples.batch(6)
    _, classifier = evaluation.finetune(
        # Three steps: the zero-initialised classifier passes no gradient back on the first.
        model.encoder, examples, 6, batches, 2, 40, epochs=3, batch_size=6, learning_rate=0.5,
        projection_head=model.projection_head, head_layer=1,
    )  # fmt: skip
    (copy,) = [layer for layer in classifier.layers if isinstance(layer, ProjectionHead)]
    assert not np.allclose(copy.dense_layers[0].kernel.numpy(), head_before[0])  # fine-tuned
    np.testing.assert_array_equal(copy.dense_layers[1].kernel.numpy(), model.projection_head.dense_layers[1].kernel)
    for before, weight in zip(head_before, model.projection_head.weights):  # the original is untouched
        np.testing.assert_array_equal(before, weight.numpy())
    with pytest.raises(ValueError, match="head_layer=1 needs the projection_head"):
        evaluation.finetune(model.encoder, examples, 6, batches, 2, 40, epochs=1, head_layer=1)


def test_linear_protocol_names():
    assert evaluation.linear_protocol_name(augment=True, standardize=False) == "official"
    assert evaluation.linear_protocol_name(augment=False, standardize=True) == "features"
    assert evaluation.linear_protocol_name(augment=True, standardize=True).startswith("custom")


def test_official_linear_protocol_crops_each_training_view_once_at_96_pixels(monkeypatch):
    # Above 32 px the evaluation preprocessing centre-crops 87.5%: the linear classifier must see the
    # encoder applied to the random crop itself, not to a centre crop of it (issue 27).
    keras.utils.set_random_seed(0)
    spatial = keras.Sequential([keras.Input((96, 96, 3)), keras.layers.AveragePooling2D(16), keras.layers.Flatten()])
    model = SimCLR(encoder=spatial, projection_head=ProjectionHead(output_dim=4), augmenter=SimCLRAugmentation(96))
    images = np.random.default_rng(4).integers(0, 256, (6, 96, 96, 3), dtype=np.uint8)
    labels = np.array([0, 1, 0, 1, 0, 1])
    examples = tf.data.Dataset.from_tensor_slices((images, labels))
    labelled = eval_run._LabelledImages(examples, labels, None, examples, examples.batch(4), 2, ("a", "b"))
    config = EvalConfig(protocol="linear", linear_protocol="official", epochs=1, eval_batch_size=4, seed=3).resolved()
    seen = {}

    def recording_linear_evaluation(train_features, *args, **kwargs):
        seen["epoch_0"] = np.asarray(train_features(0))
        return linear_evaluation(train_features, *args, **kwargs)

    linear_evaluation = evaluation.linear_evaluation
    monkeypatch.setattr(evaluation, "linear_evaluation", recording_linear_evaluation)
    encoder = Encoder.from_model(model)
    eval_run._linear(config, encoder, labelled, 96)

    # The crops of epoch 0: batches of 4 (eval_batch_size), each drawn from the seed of (seed, epoch, batch).
    views = np.concatenate([
        evaluation.random_crop_and_flip(
            tf.constant(images[start : start + 4]), 96, evaluation._batch_seed(3, 0, start // 4), encoder.crop_sampler
        )
        for start in (0, 4)
    ])  # fmt: skip
    assert not np.allclose(views, images / 255.0, atol=0.05)  # cropped, not the whole images
    # Independent: 16 x 16 block means of each view, in numpy.
    expected = views.reshape(6, 6, 16, 6, 16, 3).mean(axis=(2, 4)).reshape(6, -1)
    np.testing.assert_allclose(seen["epoch_0"], expected, atol=TOLERANCE)
