"""Image folder and TFDS pipelines: labels, decoding, order, determinism and resumption."""

import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from conftest import BAD_FILES

from simclr_keras import data, dataset_sources


def _write_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tf.io.write_file(path, tf.io.encode_png(array))


@pytest.fixture
def small_folder(tmp_path):
    """train: 3 classes with 3, 2, 1 images; test: 1 per class; unlabeled: 2 loose images."""
    rng = np.random.default_rng(0)
    counts = {"cat": 3, "ant": 2, "bee": 1}
    for name, count in counts.items():
        for index in range(count):
            _write_png(str(tmp_path / "train" / name / f"{index}.png"), rng.integers(0, 256, (8, 8, 3), np.uint8))
        _write_png(str(tmp_path / "test" / name / "0.png"), rng.integers(0, 256, (8, 8, 3), np.uint8))
    for index in range(2):
        _write_png(str(tmp_path / "unlabeled" / f"u{index}.png"), rng.integers(0, 256, (8, 8, 3), np.uint8))
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    return tmp_path


def test_folder_classes_are_sorted_names_and_order_is_round_robin(small_folder):
    paths, labels, class_names = data.list_image_folder(str(small_folder), "train")
    assert class_names == ("ant", "bee", "cat")
    # First image of every class, then the second of those that have one, then the third.
    assert labels == [0, 1, 2, 0, 2, 2]
    assert [os.path.basename(p) for p in paths] == ["0.png", "0.png", "0.png", "1.png", "1.png", "2.png"]
    assert not any(p.endswith(".txt") for p in paths)


def test_unlabeled_images_get_label_minus_one_and_splits_join(small_folder):
    assert data.default_pretraining_split(f"folder:{small_folder}") == "train+unlabeled"
    _, labels, _ = data.list_image_folder(str(small_folder), "train+unlabeled")
    assert labels[-2:] == [-1, -1] and len(labels) == 8


def test_folder_images_decode_to_the_files_pixels_and_resize(small_folder, tmp_path):
    dataset, info = data.load_images(f"folder:{small_folder}", "test", image_size=8)
    assert (info.num_examples, info.num_classes) == (3, 3)
    images, labels = zip(*[(x.numpy(), int(y)) for x, y in dataset])
    paths, expected_labels, _ = data.list_image_folder(str(small_folder), "test")
    assert list(labels) == expected_labels
    for image, path in zip(images, paths):
        assert image.dtype == np.uint8 and image.shape == (8, 8, 3)
        np.testing.assert_array_equal(image, tf.io.decode_png(tf.io.read_file(path)).numpy())

    # The view size resizes nothing (crops come from the original pixels); max_source_size caps.
    native, _ = data.load_images(f"folder:{small_folder}", "test", image_size=4)
    np.testing.assert_array_equal(next(iter(native))[0].numpy(), images[0])
    resized, _ = data.load_images(f"folder:{small_folder}", "test", image_size=4, max_source_size=4)
    image = next(iter(resized))[0].numpy()
    assert image.shape == (4, 4, 3)
    # A 2x downscale with antialiasing averages 2x2 blocks (approximately, the bicubic filter is wider).
    block_means = images[0].reshape(4, 2, 4, 2, 3).mean(axis=(1, 3))
    assert np.abs(image.astype(float) - block_means).mean() < 40


def test_real_cifar10_subset_is_class_balanced(cifar10_500):
    dataset, info = data.load_images(f"folder:{cifar10_500}", "train", image_size=32, max_examples=100)
    labels = np.array([int(y) for _, y in dataset])
    assert info.num_examples == 100 and info.num_classes == 10
    np.testing.assert_array_equal(np.bincount(labels), np.full(10, 10))


def _batches_as_arrays(dataset, count):
    return [x.numpy() for x, _ in dataset.take(count)]


def test_training_batches_cover_each_epoch_once_and_resume_exactly(small_folder):
    dataset, info = data.load_images(f"folder:{small_folder}", "train+unlabeled", image_size=8)
    stream = data.training_batches(dataset, info, batch_size=4, image_size=8, seed=3)
    batches = _batches_as_arrays(stream, 6)  # 8 images, 2 steps per epoch, 3 epochs
    all_images = np.stack([x.numpy() for x, _ in dataset])
    for epoch in range(3):
        epoch_images = np.concatenate(batches[2 * epoch : 2 * epoch + 2])
        # Every image exactly once per epoch: sort both sets of flattened images and compare.
        np.testing.assert_array_equal(
            np.sort(epoch_images.reshape(8, -1), axis=0), np.sort(all_images.reshape(8, -1), axis=0)
        )
    assert not np.array_equal(batches[0], batches[2]), "epochs should be shuffled differently"

    again = _batches_as_arrays(data.training_batches(dataset, info, 4, 8, seed=3), 6)
    for first, second in zip(batches, again):
        np.testing.assert_array_equal(first, second)
    resumed = _batches_as_arrays(data.training_batches(dataset, info, 4, 8, seed=3, start_step=3), 3)
    for first, second in zip(batches[3:], resumed):
        np.testing.assert_array_equal(first, second)
    other_seed = _batches_as_arrays(data.training_batches(dataset, info, 4, 8, seed=4), 2)
    assert not all(np.array_equal(a, b) for a, b in zip(batches, other_seed))


def test_batch_larger_than_dataset_is_an_error(small_folder):
    dataset, info = data.load_images(f"folder:{small_folder}", "train", image_size=8)
    with pytest.raises(ValueError, match="batch_size=64"):
        data.training_batches(dataset, info, batch_size=64, image_size=8)


def test_missing_folder_split_and_unknown_dataset_name_the_input(small_folder, tmp_path):
    with pytest.raises(data.DatasetNotFoundError, match="split 'validation'"):
        data.load_images(f"folder:{small_folder}", "validation", image_size=8)
    with pytest.raises(data.DatasetNotFoundError, match="no train/ folder"):
        data.load_images(f"folder:{tmp_path / 'nothing'}", "train", image_size=8)
    with pytest.raises(data.DatasetNotFoundError, match="unknown dataset 'mnist'"):
        data.load_images("mnist", "train", image_size=8)


def test_tfds_cifar10_and_stl10_unlabelled_through_mock_data(monkeypatch):
    monkeypatch.delenv(dataset_sources.LOCAL_DATA_ENV, raising=False)  # TFDS itself, not the local copy
    # mock_data replaces what a prepared copy would hold; the download path is tests/test_dataset_sources.py's.
    monkeypatch.setattr(dataset_sources, "prepared_builder", lambda name, data_dir=None: tfds.builder(name, data_dir=data_dir))
    # USE_CODE: split metadata comes from the builder code, not from files this machine lacks.
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        dataset, info = data.load_images("cifar10", "train", image_size=32)
        images, labels = next(iter(dataset.batch(12)))
        assert images.shape == (12, 32, 32, 3) and images.dtype == tf.uint8
        assert info.num_classes == 10 and info.num_examples == 12
        assert set(labels.numpy()) <= set(range(10))

        split = data.default_pretraining_split("stl10")
        dataset, info = data.load_images("stl10", split, image_size=32, max_examples=5)
        images, _ = next(iter(dataset.batch(5)))
        # STL-10 stays at its own 96 px: the views are cropped from it, as in the official code.
        assert split == "train+unlabelled" and images.shape == (5, 96, 96, 3)


# --------------------------------------------------------------------------------------
# Crops from the full-resolution image (issue 12, item 4)
# --------------------------------------------------------------------------------------


@pytest.fixture
def large_photos(tmp_path):
    """train/<class>/0.png: three noise images of 24000 pixels each, none square, one per class."""
    rng = np.random.default_rng(4)
    originals = {}
    for name, shape in (("wide", (120, 200)), ("tall", (160, 150)), ("long", (100, 240))):
        originals[name] = rng.integers(0, 256, (*shape, 3), np.uint8)
        _write_png(str(tmp_path / "train" / name / "0.png"), originals[name])
    return tmp_path, [originals[name] for name in sorted(originals)]  # label order: sorted class names


def _block_positions(original, block):
    """The (top, left) positions where `block` appears verbatim in `original`."""
    size = block.shape[0]
    candidates = np.argwhere(np.all(original[: original.shape[0] - size + 1, : original.shape[1] - size + 1] == block[0, 0], axis=-1))
    return [(top, left) for top, left in candidates if np.array_equal(original[top : top + size, left : left + size], block)]


def _official_center_crop(image, size, crop_proportion=0.875):
    """google-research/simclr tf2 data_util.center_crop for a square output, written out."""
    height, width = image.shape[:2]
    side = int(np.rint(crop_proportion * min(height, width)))
    top, left = (height - side + 1) // 2, (width - side + 1) // 2
    crop = tf.cast(image[top : top + side, left : left + side], tf.float32)[None] / 255.0
    return tf.clip_by_value(tf.image.resize(crop, [size, size], method="bicubic"), 0.0, 1.0)[0].numpy()


@pytest.mark.parametrize("cache_limit_bytes", [data.DEFAULT_CACHE_LIMIT_BYTES, 0])
def test_views_of_large_non_square_images_are_cut_from_their_original_pixels(large_photos, cache_limit_bytes):
    from simclr_keras.augment import SimCLRAugmentation

    root, originals = large_photos
    images, info = data.load_images(f"folder:{root}", "train", image_size=64, cache_limit_bytes=cache_limit_bytes)
    assert info.padded and info.image_shape == (160, 240)
    assert (info.decoded is None) == (cache_limit_bytes == 0)  # in memory, or streamed from the files
    # Crops of 4096 of the 24000 pixels at aspect ratio 1 are 64 x 64: resized to 64 px they are
    # the original pixels, verbatim. Squashing an image to 64 x 64 first would make them 26 px
    # crops of a resampled copy, upsampled.
    augmenter = SimCLRAugmentation(
        64, crop_area_range=(4096 / 24000, 4096 / 24000), aspect_ratio_range=(1.0, 1.0), crop_sampler="torchvision",
        flip_probability=0.0, color_jitter_probability=0.0, grayscale_probability=0.0,
    )  # fmt: skip
    batch, labels = next(iter(data.training_batches(images, info, 3, 64, cache_limit_bytes=cache_limit_bytes)))
    for seed in range(3):
        views = augmenter(batch, training=True, seed=tf.constant([seed, 1])).numpy()
        for view, label in zip(views, labels.numpy()):
            block = np.rint(view * 255.0).astype(np.uint8)
            assert np.abs(view * 255.0 - block).max() < 1e-3
            assert len(_block_positions(originals[label], block)) == 1
    # The evaluation view is the official centre crop (87.5% above 32 px) of each original image.
    batch, labels = next(iter(data.evaluation_batches(images, info, 3, 64, cache_limit_bytes=cache_limit_bytes)))
    views = SimCLRAugmentation(64)(batch, training=False).numpy()
    for view, label in zip(views, labels.numpy()):
        assert np.abs(view - _official_center_crop(originals[label], 64)).max() < 1e-5


def test_images_above_max_source_size_are_downscaled_keeping_their_aspect_ratio(large_photos):
    root, originals = large_photos
    images, info = data.load_images(f"folder:{root}", "train", image_size=32, max_source_size=60)
    elements = list(images.as_numpy_iterator())
    for (element, label) in elements:
        height, width = element["image_shapes"]
        original_height, original_width = originals[label].shape[:2]
        assert max(height, width) == 60
        assert abs(height / width - original_height / original_width) < 0.02
    with pytest.raises(ValueError, match="max_source_size=0"):
        data.load_images(f"folder:{root}", "train", image_size=32, max_source_size=0)


# Awkward folders (issue 6): the `bad_folder` fixture of conftest.py.


def test_folder_decodes_what_it_can_and_names_what_it_skips(bad_folder):
    root, arrays = bad_folder
    images, info = data.load_images(f"folder:{root}", "train", image_size=32)
    assert info.class_names == ("airplane", "cat", "empty_class")  # sorted folder names, empty one kept
    assert {os.path.basename(path): reason for path, reason in info.skipped_files}.keys() == BAD_FILES.keys()
    for path, reason in info.skipped_files:
        assert BAD_FILES[os.path.basename(path)] in reason, (path, reason)
    assert info.num_examples == 12 + 12 + 7  # the real JPEGs and the 7 decodable oddities
    assert any("notes.txt" in note for note in info.notes)
    assert any("empty_class" in note for note in info.notes)

    # Images of different sizes (the 300x7 one): each element is the image at its own size in the
    # top-left corner of a canvas of the largest height and width, and that size.
    assert info.padded and info.image_shape == (300, 32)
    paths, _, _ = data.list_image_folder(root, "train")
    kept = [path for path in paths if os.path.basename(path) not in BAD_FILES]

    def unpadded(element):
        height, width = element[data.IMAGE_SHAPES]
        return element["images"][:height, :width]

    decoded = {os.path.basename(path): unpadded(element) for path, (element, _) in zip(kept, images.as_numpy_iterator())}
    assert decoded.pop("odd_size.png").shape == (300, 7, 3)
    assert all(image.shape == (32, 32, 3) and image.dtype == np.uint8 for image in decoded.values())
    np.testing.assert_array_equal(decoded["gray.png"], np.repeat(arrays["gray"], 3, axis=2))
    np.testing.assert_array_equal(decoded["rgba.png"], arrays["rgba"][..., :3])  # alpha dropped
    assert "nested.png" in decoded and "palette.png" in decoded and "animated.gif" in decoded

    # Streamed (too large for memory): the same images, from a second decode of the good files only.
    streamed, streamed_info = data.load_images(f"folder:{root}", "train", image_size=32, cache_limit_bytes=0)
    assert streamed_info.decoded is None and streamed_info.num_examples == info.num_examples
    for (first, label), (second, streamed_label) in zip(images, streamed):
        for key in ("images", data.IMAGE_SHAPES):
            np.testing.assert_array_equal(first[key], second[key])
        assert label == streamed_label
    batches = data.training_batches(images, info, batch_size=8, image_size=32)
    batch = next(iter(batches))[0]
    assert batch["images"].shape == (8, 300, 32, 3) and batch[data.IMAGE_SHAPES].shape == (8, 2)

    with pytest.raises(data.InvalidImageError, match=r"train/cat/\w+\.(jpg|png) does not decode"):
        data.load_images(f"folder:{root}", "train", image_size=32, strict=True)


def test_skipped_files_report_names_the_first_twenty_then_counts():
    skipped = tuple((f"/data/train/x/{index}.jpg", "Input is empty.") for index in range(25))
    report = data.skipped_files_report(data.DatasetInfo(5, 2, ("a", "b"), skipped))
    assert report[0] == "skipped 25 file(s) that do not decode as images:"
    assert report[1] == "  /data/train/x/0.jpg: Input is empty." and len(report) == 22
    assert report[-1] == "  ... and 5 more (25 skipped in all)"
    assert data.skipped_files_report(data.DatasetInfo(5, 2, ("a", "b"))) == []


def test_unlabeled_split_accepts_any_nesting(tmp_path):
    for path in ("train/a/0.png", "train/b/0.png", "unlabeled/0.png", "unlabeled/batch1/part2/1.png"):
        _write_png(str(tmp_path / path), np.zeros((4, 4, 3), np.uint8))
    _, labels, _ = data.list_image_folder(str(tmp_path), "unlabeled")
    assert labels == [-1, -1]


def test_bad_arguments_raise_value_errors_naming_them(bad_folder):
    root, _ = bad_folder
    images, info = data.load_images(f"folder:{root}", "test", image_size=8)
    for call, message in [
        (lambda: data.load_images(f"folder:{root}", "test", image_size=0), "image_size=0"),
        (lambda: data.training_batches(images, info, batch_size=0, image_size=8), "batch_size=0"),
        (lambda: data.training_batches(images, info, batch_size=2, image_size=8, start_step=-1), "start_step=-1"),
        (lambda: data.evaluation_batches(images, info, batch_size=0, image_size=8), "batch_size=0"),
        (lambda: data.check_dataset("mnist", ["train"]), "unknown dataset 'mnist'"),
    ]:
        with pytest.raises(ValueError, match=message):
            call()
