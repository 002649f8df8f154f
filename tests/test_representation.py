"""Any Keras model is an encoder: functional, Sequential, subclassed, keras.applications networks.

Each kind trains with `fit` inside SimCLR and MoCo and survives a `.keras` file; an encoder whose
representation cannot be [batch, D] fails at construction with one line that names the fix.
"""

import keras
import numpy as np
import pytest

from simclr_keras import MoCo, ProjectionHead, SimCLR, SimCLRAugmentation

IMAGE_SIZE = 16
APPLICATIONS_SIZE = 32  # MobileNetV2's smallest input


@keras.saving.register_keras_serializable(package="test_representation")
class SubclassedEncoder(keras.Model):
    """Conv-BN-ReLU-pool written as a subclass: no output until it is called."""

    def __init__(self, width=8, **kwargs):
        super().__init__(**kwargs)
        self.width = width
        self.conv = keras.layers.Conv2D(width, 3, use_bias=False)
        self.batch_norm = keras.layers.BatchNormalization()
        self.pool = keras.layers.GlobalAveragePooling2D()

    def call(self, images, training=False):
        return self.pool(keras.activations.relu(self.batch_norm(self.conv(images), training=training)))

    def get_config(self):
        return {**super().get_config(), "width": self.width}


def sequential_encoder(with_input):
    inputs = [keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))] if with_input else []
    layers = [keras.layers.Conv2D(6, 3), keras.layers.BatchNormalization(), keras.layers.GlobalAveragePooling2D()]
    return keras.Sequential(inputs + layers)


def mobilenet_encoder():
    return keras.applications.MobileNetV2(
        weights=None, include_top=False, pooling="avg", input_shape=(APPLICATIONS_SIZE, APPLICATIONS_SIZE, 3),
        alpha=0.35,
    )  # fmt: skip


# name -> (a fresh encoder, its image size, the width D of its h as the architecture defines it)
ENCODERS = {
    "sequential_with_input": (lambda: sequential_encoder(True), IMAGE_SIZE, 6),
    "sequential_without_input": (lambda: sequential_encoder(False), IMAGE_SIZE, 6),
    "subclassed": (lambda: SubclassedEncoder(width=8), IMAGE_SIZE, 8),
    # MobileNetV2's last 1x1 convolution has 1280 filters whatever alpha < 1.
    "keras_applications_mobilenet_v2": (mobilenet_encoder, APPLICATIONS_SIZE, 1280),
}
SLOW_ENCODERS = {"keras_applications_mobilenet_v2"}  # 30 s on 2 CPU cores


def build(model_class, name, **settings):
    make_encoder, image_size, _ = ENCODERS[name]
    keras.utils.set_random_seed(1)
    model = model_class(
        encoder=make_encoder(),
        projection_head=ProjectionHead(num_layers=2, output_dim=8),
        augmenter=SimCLRAugmentation(image_size, color_jitter_strength=0.5, seed=1),
        num_classes=3,
        **settings,
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    return model


def batch(image_size, n=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, image_size, image_size, 3), np.uint8), rng.integers(0, 3, n)


def snapshot(layer):
    return [weight.numpy().copy() for weight in layer.weights]


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=[pytest.mark.slow] * (name in SLOW_ENCODERS)) for name in sorted(ENCODERS)]
)
def test_simclr_with_any_encoder_trains_with_fit_and_saves(name, tmp_path):
    model = build(SimCLR, name)
    _, image_size, width = ENCODERS[name]
    assert model.representation_shape == (None, width)
    assert tuple(model.probe.classifier.kernel.shape) == (width, 3)
    before = snapshot(model.encoder)
    images, labels = batch(image_size)
    history = model.fit(images, labels, batch_size=4, epochs=1, verbose=0)  # two steps
    assert np.isfinite(history.history["loss"][-1]) and np.isfinite(history.history["probe_loss"][-1])
    assert any(not np.allclose(a, b) for a, b in zip(before, snapshot(model.encoder)))
    # h as a plain call of the trained encoder gives it: width D per image.
    assert model.encoder(np.zeros((2, image_size, image_size, 3), np.float32)).shape == (2, width)

    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded(images), model(images), atol=1e-5)
    loaded.fit(images, labels, batch_size=4, epochs=1, verbose=0)  # and it keeps training


@pytest.mark.parametrize("name", ["sequential_without_input", "subclassed"])
def test_moco_key_encoder_is_a_built_copy_that_follows_by_momentum(name):
    model = build(MoCo, name, queue_size=16, batch_norm_splits=2, momentum=0.9)
    query, key = model.encoder.trainable_weights, model.key_encoder.trainable_weights
    assert len(query) == len(key) > 0
    initial = [weight.numpy().copy() for weight in query]
    for q, k in zip(initial, key):
        np.testing.assert_array_equal(q, k.numpy())
    images, labels = batch(IMAGE_SIZE)
    model.fit(images, labels, batch_size=8, epochs=1, verbose=0)
    for start, q, k in zip(initial, query, key):  # key <- 0.9 key + 0.1 query, the key being the start
        np.testing.assert_allclose(k.numpy(), 0.9 * start + 0.1 * q.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_gradient_cache_with_a_subclassed_encoder_gives_the_plain_steps_weights():
    # Without BatchNorm (encoder and head) the gradient cache is exact: micro-batches of 2 images
    # must reach the weights of one pass over the whole batch.
    def model(micro_batch_size):
        keras.utils.set_random_seed(2)
        simclr = SimCLR(
            encoder=SubclassedEncoder(width=8, name="encoder"),
            projection_head=ProjectionHead(num_layers=2, output_dim=8, batch_norm="none"),
            augmenter=SimCLRAugmentation(IMAGE_SIZE, seed=2),
            micro_batch_size=micro_batch_size,
        )
        simclr.encoder.batch_norm.trainable = False  # inference-mode BatchNorm: a fixed affine map
        simclr.compile(optimizer=keras.optimizers.SGD(0.5))
        return simclr

    plain, cached = model(None), model(2)
    images, _ = batch(IMAGE_SIZE)
    for simclr in (plain, cached):
        simclr.fit(images, batch_size=8, epochs=1, verbose=0, shuffle=False)
    assert cached.representation_shape == (None, 8)
    moved = 0
    for a, b, start in zip(plain.trainable_weights, cached.trainable_weights, model(None).trainable_weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)
        moved += not np.allclose(a.numpy(), start.numpy())
    assert moved > 0


def test_an_encoder_without_pooling_fails_naming_the_pooling_layer():
    encoder = keras.Sequential([keras.layers.Conv2D(4, 3)])
    with pytest.raises(ValueError, match=r"returns \(None, 14, 14, 4\).*GlobalAveragePooling2D") as error:
        SimCLR(encoder, ProjectionHead(), SimCLRAugmentation(IMAGE_SIZE))
    assert "\n" not in str(error.value)


def test_an_encoder_of_another_input_size_fails_naming_both_sizes():
    encoder = keras.Sequential([keras.Input((24, 24, 3)), keras.layers.GlobalAveragePooling2D()])
    with pytest.raises(ValueError, match=r"views of shape \(None, 16, 16, 3\).*augmenter of its image size") as error:
        SimCLR(encoder, ProjectionHead(), SimCLRAugmentation(IMAGE_SIZE))
    assert "\n" not in str(error.value)


class UnconfigurableEncoder(keras.Model):
    """A subclassed encoder taking a layer object: Keras cannot write its get_config."""

    def __init__(self, convolution, **kwargs):
        super().__init__(**kwargs)
        self.convolution, self.pool = convolution, keras.layers.GlobalAveragePooling2D()

    def call(self, images):
        return self.pool(self.convolution(images))


def test_moco_with_an_encoder_it_cannot_copy_fails_naming_get_config():
    encoder = UnconfigurableEncoder(keras.layers.Conv2D(4, 3))
    SimCLR(encoder, ProjectionHead(output_dim=4), SimCLRAugmentation(IMAGE_SIZE))  # SimCLR needs no copy
    with pytest.raises(ValueError, match=r"key encoder as UnconfigurableEncoder.from_config.*give Unconfig.*get_config"):
        MoCo(encoder=encoder, projection_head=ProjectionHead(output_dim=4), augmenter=SimCLRAugmentation(IMAGE_SIZE))


def functional_encoder():
    images = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    features = keras.layers.BatchNormalization()(keras.layers.Conv2D(5, 3)(images))
    return keras.Model(images, keras.layers.GlobalAveragePooling2D()(features))


# name -> (a fresh encoder, its image size)
EXPORTED_ENCODERS = {
    "functional": (functional_encoder, IMAGE_SIZE),
    "sequential_with_input": (lambda: sequential_encoder(True), IMAGE_SIZE),
    "sequential_without_input": (lambda: sequential_encoder(False), IMAGE_SIZE),
    "subclassed": (lambda: SubclassedEncoder(width=8), IMAGE_SIZE),
    "keras_applications_mobilenet_v2": (mobilenet_encoder, APPLICATIONS_SIZE),
}


def trained_for_export(make_encoder, image_size=IMAGE_SIZE):
    """A SimCLR model of that encoder after two steps: weights and BatchNorm statistics away from their start."""
    keras.utils.set_random_seed(3)
    model = SimCLR(
        encoder=make_encoder(), projection_head=ProjectionHead(num_layers=2, output_dim=8),
        augmenter=SimCLRAugmentation(image_size, color_jitter_strength=0.5, seed=3),
    )  # fmt: skip
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    model.fit(batch(image_size)[0], batch_size=4, epochs=1, verbose=0)
    return model


@pytest.mark.parametrize(
    "name",
    [pytest.param(name, marks=[pytest.mark.slow] * (name in SLOW_ENCODERS)) for name in sorted(EXPORTED_ENCODERS)],
)
def test_any_encoder_exports_and_loads_back_with_its_weights(name, tmp_path):
    from simclr_keras import Encoder, export, load_encoder

    make_encoder, image_size = EXPORTED_ENCODERS[name]
    model = trained_for_export(make_encoder, image_size)
    version_dir = export.export_encoder(model, str(tmp_path / "exports"))
    images = batch(image_size, n=5, seed=4)[0]
    views = model.augmenter(images, training=False)
    embeddings = model.encoder(views, training=False).numpy()  # the Keras model's h, inference mode
    projections = model.projection_head(embeddings, training=False, head_layer=1).numpy()

    np.testing.assert_allclose(load_encoder(version_dir)(images).numpy(), embeddings, rtol=0, atol=1e-5)
    np.testing.assert_allclose(load_encoder(version_dir, head_layer=1)(images).numpy(), projections, rtol=0, atol=1e-5)
    encoder = Encoder.from_export(version_dir)
    assert encoder.rebuild_error is None and encoder.backbone is not None
    np.testing.assert_allclose(encoder.features(images).numpy(), embeddings, rtol=0, atol=1e-5)  # the signature
    np.testing.assert_allclose(encoder.view_features()(views).numpy(), embeddings, rtol=0, atol=1e-5)  # rebuilt
    assert np.abs(embeddings).max() > 0.01


def test_an_export_of_an_earlier_version_without_saved_weights_still_loads(tmp_path):
    # Earlier exports keyed their weights by path and recorded no order; a functional encoder's paths match.
    import json
    import os

    from simclr_keras import export, load_encoder

    model = trained_for_export(functional_encoder)
    version_dir = export.export_encoder(model, str(tmp_path / "exports"))
    metadata_path = os.path.join(version_dir, export.METADATA_PATH)
    with open(metadata_path, encoding="utf-8") as file:
        metadata = json.load(file)
    del metadata["saved_weights"]
    with open(metadata_path, "w", encoding="utf-8") as file:
        json.dump(metadata, file)
    images = batch(IMAGE_SIZE, n=3, seed=5)[0]
    expected = model.encoder(model.augmenter(images, training=False), training=False).numpy()
    np.testing.assert_allclose(load_encoder(version_dir)(images).numpy(), expected, rtol=0, atol=1e-5)
