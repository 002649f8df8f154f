"""--flip_probability, --grayscale_probability, --color_jitter_probability: from the training flags to the
views SimCLRAugmentation draws (the arms of the paper's Fig. 5: crop only, crop + colour, the full recipe)."""

import numpy as np
import pytest
import tensorflow as tf

from simclr_keras import config_flags
from simclr_keras.model_config import build_components
from simclr_keras.train_config import TrainConfig

SEED = tf.constant([7, 11])


def augmenter_of(config):
    """The augmenter a training run builds from `config` (TrainConfig -> ModelConfig -> build_components)."""
    _, _, augmenter = build_components(config.model_config())
    return augmenter


def random_images(count, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def every_crop(image, output_size):
    """Every integer box of `image` [S, S, 3] resized bicubically by tf.image.resize, clipped to [0, 1]: [K, o, o, 3]."""
    size = image.shape[0]
    image = tf.constant(image, tf.float32) / 255.0
    crops = []
    for height in range(1, size + 1):
        for width in range(1, size + 1):
            boxes = [image[top : top + height, left : left + width]
                     for top in range(size - height + 1) for left in range(size - width + 1)]  # fmt: skip
            crops.append(tf.image.resize(tf.stack(boxes), (output_size, output_size), method="bicubic"))
    return tf.clip_by_value(tf.concat(crops, axis=0), 0.0, 1.0).numpy()


def test_the_defaults_are_the_papers_and_an_old_flags_txt_keeps_them(tmp_path):
    # A flags.txt written before these flags existed (no line for them).
    (tmp_path / "flags.txt").write_text("--model_dir=/old/run\n--color_jitter_strength=0.5\n--seed=3\n")
    config = TrainConfig.from_run_dir(str(tmp_path))
    augmenter = augmenter_of(config)
    # SimCLR App. A: flip 0.5, colour jitter applied with 0.8, grayscale (colour drop) with 0.2.
    assert (augmenter.flip_probability, augmenter.color_jitter_probability, augmenter.grayscale_probability) == (
        0.5, 0.8, 0.2,
    )  # fmt: skip
    assert augmenter.color_jitter_strength == 0.5 and augmenter.seed == 3
    # Crops of 8-100% of the area, a blur sigma per image with mirrored borders, as before these flags.
    assert augmenter.crop_area_range == (0.08, 1.0)
    assert (augmenter.blur_padding, augmenter.blur_sigma_per) == ("reflect", "image")
    assert config.nesterov is None


def test_the_flags_reach_the_augmenter(tmp_path):
    (tmp_path / "flags.txt").write_text(
        "--model_dir=/run\n--flip_probability=0.25\n--grayscale_probability=0\n--color_jitter_probability=0.6\n"
    )
    augmenter = augmenter_of(config_flags.read_flagfile(TrainConfig, str(tmp_path / "flags.txt")))
    assert (augmenter.flip_probability, augmenter.grayscale_probability, augmenter.color_jitter_probability) == (
        0.25, 0.0, 0.6,
    )  # fmt: skip


def test_crop_only_views_are_bicubic_crops_of_the_image():
    # Colour jitter keeps its strength; its probability 0 must switch it off.
    config = TrainConfig(
        model_dir="/run", image_size=8, flip_probability=0.0, grayscale_probability=0.0, color_jitter_probability=0.0
    )
    images = random_images(32, 8)  # enough views that a default probability would show
    views = augmenter_of(config)(images, training=True, seed=SEED).numpy()  # (32, 8, 8, 3)
    for image, view in zip(images, views):
        distances = np.abs(every_crop(image, 8) - view[None]).max(axis=(1, 2, 3))
        assert distances.min() < 1e-5, distances.min()


def test_grayscale_probability_one_makes_every_view_gray():
    augmenter = augmenter_of(TrainConfig(model_dir="/run", grayscale_probability=1.0))
    views = augmenter(random_images(16, 32), training=True, seed=SEED).numpy()
    np.testing.assert_array_equal(views[..., 0], views[..., 1])
    np.testing.assert_array_equal(views[..., 1], views[..., 2])


def test_flip_probability_one_mirrors_the_views_of_flip_probability_zero():
    images = random_images(16, 32)
    views = {
        probability: augmenter_of(TrainConfig(model_dir="/run", flip_probability=probability))(
            images, training=True, seed=SEED
        ).numpy()
        for probability in (0.0, 1.0)
    }
    # Same seed, same crops and colours; colour jitter and grayscale act per pixel (contrast on the mean).
    np.testing.assert_allclose(views[1.0], views[0.0][:, :, ::-1], rtol=0, atol=1e-5)
    assert np.abs(views[1.0] - views[0.0]).max() > 0.1  # the mirror image is not the view itself


@pytest.mark.parametrize("name", ["flip_probability", "grayscale_probability", "color_jitter_probability"])
def test_probabilities_outside_zero_one_are_refused(name):
    assert TrainConfig(model_dir="/run", **{name: 1.5}).validate() == [f"{name} must be in [0, 1], got 1.5."]
    with pytest.raises(ValueError, match=rf"{name} must be in \[0, 1\], got -0.5\."):
        build_components(TrainConfig(model_dir="/run").model_config().replace(**{name: -0.5}))


def test_the_crop_and_blur_flags_reach_the_augmenter(tmp_path):
    (tmp_path / "flags.txt").write_text(
        "--model_dir=/run\n--min_crop_area=0.2\n--use_blur\n--blur_padding=zeros\n--blur_sigma_per=batch\n"
    )
    augmenter = augmenter_of(config_flags.read_flagfile(TrainConfig, str(tmp_path / "flags.txt")))
    assert augmenter.crop_area_range == (0.2, 1.0)
    assert (augmenter.use_blur, augmenter.blur_padding, augmenter.blur_sigma_per) == (True, "zeros", "batch")


def test_min_crop_area_one_crops_the_whole_image():
    settings = dict(model_dir="/run", image_size=8, flip_probability=0.0, grayscale_probability=0.0,
                    color_jitter_probability=0.0)  # fmt: skip
    images = random_images(16, 8)
    whole = augmenter_of(TrainConfig(**settings, min_crop_area=1.0))(images, training=True, seed=SEED).numpy()
    np.testing.assert_allclose(whole, images / 255.0, rtol=0, atol=1e-5)
    cropped = augmenter_of(TrainConfig(**settings))(images, training=True, seed=SEED).numpy()
    assert np.abs(cropped - images / 255.0).max() > 0.1  # 8% crops are not the image


@pytest.mark.parametrize(
    "setting,message",
    [
        ({"min_crop_area": 0.0}, "min_crop_area must be in (0, 1] (a fraction of the image's area), got 0.0."),
        ({"min_crop_area": 1.5}, "min_crop_area must be in (0, 1] (a fraction of the image's area), got 1.5."),
        ({"nesterov": False}, "nesterov=False applies to optimizer=sgd, got optimizer=lars."),
        ({"blur_padding": "same"}, "blur_padding must be one of ['reflect', 'zeros'], got 'same'."),
        ({"blur_sigma_per": "view"}, "blur_sigma_per must be one of ['image', 'batch'], got 'view'."),
    ],
)
def test_crop_blur_and_momentum_settings_are_checked_in_one_line(setting, message):
    assert TrainConfig(model_dir="/run", **setting).validate() == [message]
