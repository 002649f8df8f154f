"""--linear_protocol=hcl_dcl: the linear evaluation of the HCL and debiased references (their linear.py),
and evaluation views of another size than the training one (their STL-10 setting: 32 px crops to
pretrain, the whole 96 px images to test). References: BatchNorm and torch's Adam written in numpy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclr_keras import Encoder, EvalConfig, SimCLR, SimCLRAugmentation, eval_run, evaluation
from simclr_keras.heads import ProjectionHead

EPSILON = 1e-3  # keras.layers.BatchNormalization's


def batch_norm_model(image_size, seed=0):
    """SimCLR whose encoder is BatchNorm on the pixels, then the spatial mean: h is BatchNorm's output per channel."""
    keras.utils.set_random_seed(seed)
    encoder = keras.Sequential([
        keras.Input((None, None, 3)), keras.layers.BatchNormalization(momentum=0.9, epsilon=EPSILON),
        keras.layers.GlobalAveragePooling2D(),
    ])  # fmt: skip
    augmenter = SimCLRAugmentation(image_size, color_jitter_strength=0.5, seed=seed, jit_compile=False)  # eager: 6 s, not 28
    return SimCLR(encoder=encoder, projection_head=ProjectionHead(output_dim=4), augmenter=augmenter)


def training_mode_features(views):
    """h of `batch_norm_model` in training mode, in numpy: statistics of this batch's pixels, gamma 1, beta 0."""
    views = np.asarray(views, np.float64)
    mean, variance = views.mean(axis=(0, 1, 2)), views.var(axis=(0, 1, 2))
    return ((views - mean) / np.sqrt(variance + EPSILON)).mean(axis=(1, 2)), mean, variance


def test_the_classifier_sees_the_encoder_in_training_mode_on_pretraining_views(monkeypatch):
    model = batch_norm_model(16)
    images = np.random.default_rng(1).integers(0, 256, (6, 24, 24, 3), dtype=np.uint8)
    labels = np.arange(6)  # each image its own class, so that the rows name their image
    examples = tf.data.Dataset.from_tensor_slices((images, labels))
    labelled = eval_run._LabelledImages(examples, labels, None, examples, examples.batch(3), 6, tuple("abcdef"))
    config = EvalConfig(protocol="linear", linear_protocol="hcl_dcl", epochs=2, batch_size=4, seed=5).resolved()
    epochs, tested = [], {}

    def recording(features_of_epoch, test_features, *args, **kwargs):
        def recorded_epoch(epoch):
            epochs.append(tuple(np.asarray(value) for value in features_of_epoch(epoch)))
            return epochs[-1]

        def recorded_test():
            tested["features"], tested["labels"] = test_features()
            return tested["features"], tested["labels"]

        return reference_linear_evaluation(recorded_epoch, recorded_test, *args, **kwargs)

    reference_linear_evaluation = evaluation.reference_linear_evaluation
    monkeypatch.setattr(evaluation, "reference_linear_evaluation", recording)
    eval_run._linear(config, Encoder.from_model(model), labelled, 16)

    assert len(epochs) == 2  # one pass per epoch: BatchNorm's moving statistics move once per batch
    moving_mean, moving_variance = np.zeros(3), np.ones(3)
    for epoch, (features, order) in enumerate(epochs):
        assert sorted(order) == list(range(6))
        for batch_index, start in enumerate((0, 4)):  # batches of 4, the last one smaller
            batch = order[start : start + 4]
            # One view per image, the pretraining augmentation's (new crops each epoch: the seed folds it in).
            views = model.augmenter(images[batch], training=True, seed=evaluation._batch_seed(5, epoch, batch_index))
            expected, mean, variance = training_mode_features(views)
            np.testing.assert_allclose(features[start : start + 4], expected, rtol=0, atol=1e-4)
            moving_mean, moving_variance = 0.9 * moving_mean + 0.1 * mean, 0.9 * moving_variance + 0.1 * variance
    assert epochs[0][1].tolist() != epochs[1][1].tolist() or not np.allclose(epochs[0][0], epochs[1][0])
    batch_norm = model.encoder.layers[0]
    np.testing.assert_allclose(batch_norm.moving_mean.numpy(), moving_mean, rtol=0, atol=1e-5)
    np.testing.assert_allclose(batch_norm.moving_variance.numpy(), moving_variance, rtol=0, atol=1e-5)
    # The test features: inference mode on the evaluation views, with the moved statistics.
    test_views = model.augmenter(images, training=False).numpy().astype(np.float64)
    expected = ((test_views - moving_mean) / np.sqrt(moving_variance + EPSILON)).mean(axis=(1, 2))
    np.testing.assert_allclose(tested["features"], expected, rtol=0, atol=1e-4)


def torch_linear_adam(features, labels, kernel, bias, epochs, learning_rate, weight_decay):
    """nn.Linear + CrossEntropyLoss + torch.optim.Adam(lr, weight_decay) on one full batch per epoch, in numpy."""
    parameters = [kernel.astype(np.float64), bias.astype(np.float64)]
    moments = [[np.zeros_like(p), np.zeros_like(p)] for p in parameters]
    one_hot = np.eye(kernel.shape[1])[labels]
    for step in range(1, epochs + 1):
        logits = features @ parameters[0] + parameters[1]
        probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        error = (probabilities - one_hot) / len(labels)  # d mean cross-entropy / d logits
        for parameter, gradient, moment in zip(parameters, [features.T @ error, error.sum(axis=0)], moments):
            gradient = gradient + weight_decay * parameter  # L2 on every parameter, the bias too
            moment[0] = 0.9 * moment[0] + 0.1 * gradient
            moment[1] = 0.999 * moment[1] + 0.001 * gradient**2
            corrected = moment[0] / (1 - 0.9**step), moment[1] / (1 - 0.999**step)
            parameter -= learning_rate * corrected[0] / (np.sqrt(corrected[1]) + 1e-8)
    return parameters


def test_the_classifier_is_torchs_linear_layer_trained_by_torchs_adam_with_l2():
    rng = np.random.default_rng(2)
    features, labels = rng.normal(size=(8, 5)).astype(np.float32), rng.integers(0, 3, 8)
    classifier = evaluation.torch_linear_classifier(5, 3, learning_rate=0.05, weight_decay=0.2, seed=3)
    kernel, bias = (weight.numpy() for weight in classifier.get_layer("linear_classifier").weights)
    # nn.Linear's initialisation: kernel and bias uniform in +-1/sqrt(D).
    bound = 1 / np.sqrt(5)
    assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound and np.abs(bias).max() > 0
    evaluation.fit_on_feature_epochs(classifier, lambda epoch: (features, labels), epochs=4, batch_size=8)
    expected = torch_linear_adam(features.astype(np.float64), labels, kernel, bias, 4, 0.05, 0.2)
    for weight, value in zip(classifier.get_layer("linear_classifier").weights, expected):
        # float32 against float64; leaving out the bias's L2 moves it by ~lr x wd x |b| = 2e-3 a step.
        np.testing.assert_allclose(weight.numpy(), value, rtol=0, atol=5e-5)


def test_hcl_dcl_defaults_are_linear_py_and_conflicting_settings_are_refused():
    config = EvalConfig(protocol="linear", linear_protocol="hcl_dcl", model_dir="run")
    assert config.validate() == []
    # linear.py: batch 512, 100 epochs, optim.Adam(lr=1e-3, weight_decay=1e-6).
    assert config.protocol_defaults() == (100, 512, 1e-3) and config.resolved().weight_decay == 1e-6
    assert EvalConfig(protocol="linear", model_dir="run").resolved().weight_decay == 0.0  # the others: none
    problems = config.replace(optimizer="lars", linear_augment=True).validate()
    assert problems == [
        "linear_protocol=hcl_dcl trains on the pretraining augmentation's views with Adam and raw features; "
        "linear_augment=True and optimizer=lars apply to linear_protocol=features or official."
    ]


def test_evaluation_at_96_pixels_of_an_encoder_pretrained_at_32():
    # The references' STL-10 test transform: the whole 96 px image into the encoder, no resize to 32.
    model = batch_norm_model(32)
    batch_norm = model.encoder.layers[0]
    batch_norm.moving_mean.assign([0.2, 0.3, 0.4])
    batch_norm.moving_variance.assign([0.5, 2.0, 1.5])
    images = np.random.default_rng(3).integers(0, 256, (4, 96, 96, 3), dtype=np.uint8)
    image_size, encoder = eval_run._encoder_at_image_size(
        EvalConfig(model_dir="run", image_size=96), Encoder.from_model(model)
    )
    assert image_size == encoder.image_size == 96
    pixels = images / 255.0
    expected = ((pixels - [0.2, 0.3, 0.4]) / np.sqrt(np.array([0.5, 2.0, 1.5]) + EPSILON)).mean(axis=(1, 2))
    np.testing.assert_allclose(encoder.features(tf.constant(images)).numpy(), expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(encoder.preprocess(images).numpy(), pixels, rtol=0, atol=1e-5)
    # The default stays the training size.
    assert eval_run._encoder_at_image_size(EvalConfig(model_dir="run"), Encoder.from_model(model))[0] == 32
