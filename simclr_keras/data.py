"""tf.data pipelines of uint8 images (and labels) from TFDS datasets or an image folder.

Augmentation is not done here: `SimCLR.train_step` makes the views, so the same pipeline feeds
pretraining, the online probe's evaluation and later protocols.

Dataset names:
  - TFDS: "cifar10", "cifar100", "stl10", "imagenet2012" (read from `data_dir`; nothing is downloaded).
  - "folder:DIR": DIR holds split folders (train/, test/, optionally unlabeled/) of class folders of
    images, the layout of `tfds.folder_dataset.ImageFolder` and `keras.utils.image_dataset_from_directory`.
    Class indices follow the sorted class folder names of train/ and are shared by every split; images
    placed directly in a split folder (as in unlabeled/) get label -1.
Splits may be joined with "+", e.g. "train+unlabelled" for STL-10.

Bad files in image folders. `load_images` decodes every file of a folder split once, up front, in
a parallel tf.data pass: JPEG, PNG (grayscale, palette, 16-bit, with alpha), GIF (first frame), BMP
and WebP of any size become uint8 RGB (grayscale replicated, alpha dropped), and files that do not
decode (random bytes, zero-byte, truncated, other formats behind an image extension, unreadable) are
left out and named in `DatasetInfo.skipped_files` with TensorFlow's reason (`skipped_files_report`
words them); with `strict=True` the first one raises `InvalidImageError` instead. TensorFlow 2.21
refuses truncated JPEGs and PNGs ("Invalid JPEG data", "Invalid PNG data") rather than decoding them
partially, so they are skipped like any corrupt file. Files without an image extension and class
folders left without images are mentioned in `DatasetInfo.notes`. A split that fits in memory is
kept as decoded there (the check costs no second decode); a larger one is decoded again, every
epoch, from the files that passed.
"""

import dataclasses
import os
import re

import numpy as np
import tensorflow as tf

FOLDER_PREFIX = "folder:"
TFDS_DATASETS = ("cifar10", "cifar100", "stl10", "imagenet2012")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
# Split folders whose images need no class folder (the others' subfolders must be classes of train/).
UNLABELED_SPLITS = ("unlabeled", "unlabelled")
# Keep decoded images in memory when they take less than this (CIFAR-10 train at 32 px: 150 MB).
DEFAULT_CACHE_LIMIT_BYTES = 4 * 1024**3


class DatasetNotFoundError(ValueError):
    """The dataset or split cannot be read; the message says what to pass instead."""


class InvalidImageError(DatasetNotFoundError):
    """A file of an image folder does not decode and `strict=True`; the message names the file.

    A subclass of DatasetNotFoundError, so that code handling unreadable datasets handles it too.
    """


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    num_examples: int
    num_classes: int  # 0 when the split has no labels
    class_names: tuple  # index -> name; for folders the sorted class folder names of train/
    # (path, reason) of each image-folder file left out because it does not decode, in listing order.
    skipped_files: tuple = ()
    # Other remarks on an image folder split: files without an image extension, empty classes.
    notes: tuple = ()
    # (images uint8 [N, S, S, 3], labels int64 [N]) tensors when the folder split was decoded into
    # memory; `training_batches` uses them rather than decoding the dataset again.
    decoded: tuple = dataclasses.field(default=None, compare=False, repr=False)


def default_pretraining_split(dataset):
    """The split SimCLR pretrains on: every image whose label is not needed."""
    if dataset == "stl10":
        return "train+unlabelled"
    if dataset.startswith(FOLDER_PREFIX):
        root = dataset[len(FOLDER_PREFIX):]
        unlabeled = [name for name in ("unlabeled", "unlabelled") if os.path.isdir(os.path.join(root, name))]
        return "+".join(["train"] + unlabeled)
    return "train"


def _class_names(root):
    train_dir = os.path.join(root, "train")
    if not os.path.isdir(train_dir):
        raise DatasetNotFoundError(
            f"--dataset=folder:{root}: no train/ folder there; expected {root}/train/<class>/<image> "
            "(and test/, optionally unlabeled/)."
        )
    return tuple(sorted(e.name for e in os.scandir(train_dir) if e.is_dir() and not e.name.startswith(".")))


def _is_image(name):
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def list_image_folder(root, split, ignored_files=None):
    """Lists (paths, labels, class_names) of one split ("train", "test", "train+unlabeled") of a folder.

    Files are ordered round-robin over classes (the first image of each class, then the second, ...),
    so that any prefix of the list, e.g. the first 500 for --max_train_examples=500, is class-balanced.
    Images in nested folders belong to the class of their top folder; in an unlabeled split
    (unlabeled/, unlabelled/) every image whose top folder is no class gets label -1. Files without
    an image extension are not listed; when `ignored_files` is a list, their paths are appended to it.
    """
    class_names = _class_names(root)
    class_index = {name: index for index, name in enumerate(class_names)}
    paths, labels = [], []
    for split_name in split.split("+"):
        split_dir = os.path.join(root, split_name)
        if not os.path.isdir(split_dir):
            available = sorted(e.name for e in os.scandir(root) if e.is_dir())
            raise DatasetNotFoundError(
                f"--dataset=folder:{root}: split '{split_name}' has no folder {split_dir}; found {available}."
            )
        per_class = {}
        for directory, subdirectories, files in os.walk(split_dir):
            subdirectories.sort()
            relative = os.path.relpath(directory, split_dir)
            top = relative.split(os.sep)[0]
            label = -1 if relative == "." else class_index.get(top)
            if label is None and split_name in UNLABELED_SPLITS:
                label = -1
            if label is None:
                raise DatasetNotFoundError(
                    f"--dataset=folder:{root}: class folder {split_name}/{top} does not exist in train/ "
                    f"(classes are {list(class_names)})."
                )
            per_class.setdefault(label, []).extend(
                os.path.join(directory, name) for name in sorted(files) if _is_image(name)
            )
            if ignored_files is not None:
                ignored_files.extend(
                    os.path.join(directory, name)
                    for name in sorted(files)
                    if not _is_image(name) and not name.startswith(".")  # .DS_Store and the like: silent
                )
        groups = [per_class[label] for label in sorted(per_class)]
        longest = max((len(group) for group in groups), default=0)
        for position in range(longest):
            for label, group in zip(sorted(per_class), groups):
                if position < len(group):
                    paths.append(group[position])
                    labels.append(label)
    if not paths:
        raise DatasetNotFoundError(f"--dataset=folder:{root}: split '{split}' holds no images ({IMAGE_EXTENSIONS}).")
    return paths, labels, class_names


def _decode_and_resize(path, label, image_size):
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    return _resize_uint8(image, image_size), label


def _resize_uint8(image, image_size):
    """Resizes one uint8 image to [image_size, image_size, 3] (antialiased), unless already that size."""
    shape = tf.shape(image)
    image = tf.cond(
        tf.logical_and(shape[0] == image_size, shape[1] == image_size),
        lambda: image,
        lambda: tf.cast(
            tf.clip_by_value(
                tf.round(tf.image.resize(image, (image_size, image_size), method="bicubic", antialias=True)),
                0,
                255,
            ),
            tf.uint8,
        ),
    )
    return tf.ensure_shape(image, (image_size, image_size, 3))


def _decode_error(path):
    """TensorFlow's one-line reason why the file at `path` does not decode as an image."""
    try:
        tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    except tf.errors.OpError as error:
        # Eager op errors read "{{function_node ...}} <reason> [Op:DecodeImage] name: ".
        message = re.sub(r"\{\{[^}]*\}\}", "", error.message).split("[Op:")[0].strip()
        return message.splitlines()[0] if message else type(error).__name__
    return "it failed to decode once but decodes now (was it being written?)"


def _decode_folder(paths, image_size, keep_images):
    """Decodes every file once, in a parallel tf.data pass; returns (indices that decode, images).

    `ignore_errors` drops the files that fail without saying which, so each element carries its
    index and the indices missing from the result are the bad files. `images` is uint8
    [len(indices), S, S, 3] in file order when `keep_images`; otherwise None, and the files are
    only decoded (not resized), which is the check.
    """

    def decode(index, path):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        return index, (_resize_uint8(image, image_size) if keep_images else tf.shape(image))

    indexed = tf.data.Dataset.from_tensor_slices((np.arange(len(paths), dtype=np.int64), paths))
    decoded = indexed.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
    # Filled in place: concatenating batches would hold the images twice.
    images = np.empty((len(paths), image_size, image_size, 3), np.uint8) if keep_images else None
    indices = []
    for index_batch, image_batch in decoded.batch(1024).prefetch(2).as_numpy_iterator():
        if keep_images:
            images[len(indices) : len(indices) + len(index_batch)] = image_batch
        indices.extend(index_batch.tolist())
    return indices, (images[: len(indices)] if keep_images else None)


def _folder_dataset(root, split, image_size, max_examples, strict, cache_limit_bytes):
    ignored = []
    paths, labels, class_names = list_image_folder(root, split, ignored)
    if max_examples:
        paths, labels = paths[:max_examples], labels[:max_examples]
    keep_images = len(paths) * image_size * image_size * 3 <= cache_limit_bytes
    kept, images = _decode_folder(paths, image_size, keep_images)
    kept_set = set(kept)
    bad = [index for index in range(len(paths)) if index not in kept_set]
    if bad and strict:
        raise InvalidImageError(
            f"--dataset=folder:{root}: {paths[bad[0]]} does not decode as an image ({_decode_error(paths[bad[0]])}); "
            f"{len(bad)} of the {len(paths)} files of split '{split}' do not. Remove or replace them, or leave out "
            "--strict_data (strict=True) to skip them."
        )
    skipped = tuple((paths[index], _decode_error(paths[index])) for index in bad)
    if not kept:
        raise DatasetNotFoundError(
            f"--dataset=folder:{root}: none of the {len(paths)} files of split '{split}' decodes as an image "
            f"(the first, {skipped[0][0]}: {skipped[0][1]})."
        )
    paths = [paths[index] for index in kept]
    label_array = np.asarray([labels[index] for index in kept], np.int64)
    has_labels = bool(np.any(label_array >= 0))

    notes = []
    if ignored:
        notes.append(
            f"{len(ignored)} file(s) without an image extension {IMAGE_EXTENSIONS} are not used, e.g. {ignored[0]}"
        )
    if has_labels:
        empty = [name for index, name in enumerate(class_names) if not np.any(label_array == index)]
        if empty:
            notes.append(f"split '{split}' holds no decodable images of class(es) {empty}")

    decoded = None
    if keep_images:
        decoded = (tf.constant(images), tf.constant(label_array))
        dataset = tf.data.Dataset.from_tensor_slices(decoded)
    else:
        dataset = tf.data.Dataset.from_tensor_slices((paths, label_array)).map(
            lambda path, label: _decode_and_resize(path, label, image_size),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        if not strict:
            # Every file decoded above; one that breaks later (changed on disk) must not end the run.
            dataset = dataset.ignore_errors(log_warning=True)
    info = DatasetInfo(
        len(paths), len(class_names) if has_labels else 0, class_names, skipped, tuple(notes), decoded
    )
    return dataset, info


def skipped_files_report(info, limit=20):
    """Lines naming the files `info` records as skipped: the first `limit`, then how many more; [] if none."""
    skipped = info.skipped_files
    if not skipped:
        return []
    lines = [f"skipped {len(skipped)} file(s) that do not decode as images:"]
    lines += [f"  {path}: {reason}" for path, reason in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more ({len(skipped)} skipped in all)")
    return lines


def _tfds_dataset(name, split, data_dir, image_size, max_examples):
    import tensorflow_datasets as tfds  # imported here: slow, and only needed for TFDS datasets

    try:
        builder = tfds.builder(name, data_dir=data_dir)
        dataset = builder.as_dataset(split=split, shuffle_files=False)
    except Exception as error:  # tfds raises several types for "not prepared" and "no such split"
        location = data_dir or "~/tensorflow_datasets"
        raise DatasetNotFoundError(
            f"--dataset={name} split '{split}' is not prepared in {location} and cannot be downloaded here "
            f"({type(error).__name__}). Prepare it where there is internet (`tfds build {name} "
            f"--data_dir=DIR`{' --manual_dir=DIR' if name == 'imagenet2012' else ''}) and pass "
            "--data_dir=DIR, or use --dataset=folder:DIR for an image folder."
        ) from None
    num_examples = int(dataset.cardinality())
    if num_examples < 0:  # unknown cardinality: count once (split metadata is missing)
        num_examples = int(dataset.reduce(0, lambda count, _: count + 1))
    label_feature = builder.info.features["label"]
    class_names = tuple(label_feature.names)
    if max_examples:
        dataset = dataset.take(max_examples)
        num_examples = min(num_examples, max_examples)
    dataset = dataset.map(
        lambda example: (_resize_uint8(example["image"], image_size), example["label"]),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return dataset, DatasetInfo(num_examples, len(class_names), class_names)


def check_dataset(dataset, splits):
    """Raises DatasetNotFoundError, as load_images would, for an unknown dataset name or a folder
    split that is missing or holds no image files; reads nothing but folder listings."""
    if dataset.startswith(FOLDER_PREFIX):
        for split in splits:
            list_image_folder(dataset[len(FOLDER_PREFIX):], split)
    elif dataset not in TFDS_DATASETS:
        raise DatasetNotFoundError(
            f"unknown dataset {dataset!r}; expected one of {list(TFDS_DATASETS)} or folder:DIR."
        )


def load_images(
    dataset,
    split,
    image_size,
    data_dir=None,
    max_examples=0,
    strict=False,
    cache_limit_bytes=DEFAULT_CACHE_LIMIT_BYTES,
):
    """Returns (tf.data.Dataset of (uint8 [S, S, 3], int64 label), DatasetInfo), unbatched, in file order.

    An image folder split is decoded once here (see the module docstring): files that do not decode
    are left out and listed in `info.skipped_files`, or, with `strict`, raise InvalidImageError.
    When its images take at most `cache_limit_bytes` they stay in memory (`info.decoded`).
    `max_examples` counts files before the bad ones are left out.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got image_size={image_size!r}.")
    if max_examples < 0:
        raise ValueError(f"max_examples must be >= 0 (0: all), got max_examples={max_examples!r}.")
    if dataset.startswith(FOLDER_PREFIX):
        return _folder_dataset(
            dataset[len(FOLDER_PREFIX):], split, image_size, max_examples, strict, cache_limit_bytes
        )
    if dataset in TFDS_DATASETS:
        return _tfds_dataset(dataset, split, data_dir, image_size, max_examples)
    raise DatasetNotFoundError(
        f"unknown dataset {dataset!r}; expected one of {list(TFDS_DATASETS)} or folder:DIR."
    )


def _fits_in_memory(info, image_size, cache_limit_bytes):
    return info.num_examples * image_size * image_size * 3 <= cache_limit_bytes


def _decode_all(images):
    """Decodes a dataset of (image, label) once into two numpy arrays."""
    image_batches, label_batches = [], []
    for image_batch, label_batch in images.batch(1024).prefetch(2).as_numpy_iterator():
        image_batches.append(image_batch)
        label_batches.append(label_batch)
    return np.concatenate(image_batches), np.concatenate(label_batches)


def training_batches(
    images,
    info,
    batch_size,
    image_size,
    seed=0,
    start_step=0,
    shuffle_buffer=50_000,
    cache_limit_bytes=DEFAULT_CACHE_LIMIT_BYTES,
):
    """An endless stream of shuffled full batches of (uint8 images, labels), from step `start_step`.

    When the decoded images fit in `cache_limit_bytes` they are decoded once into memory and every
    epoch is a uniform random permutation drawn statelessly from (seed, epoch): the order of every
    epoch is fixed by `seed`, and a resumed run sees exactly the batches an uninterrupted run would
    have. Larger datasets are streamed through a `shuffle_buffer`-sized shuffle, and a resumed run
    skips the batches already seen. An image folder that `load_images` decoded into memory
    (`info.decoded`) is taken from there, not decoded again.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got batch_size={batch_size!r}.")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got start_step={start_step!r}.")
    steps_per_epoch = info.num_examples // batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"batch_size={batch_size} is larger than the {info.num_examples} training images; "
            "use a smaller --batch_size or more data."
        )
    if info.decoded is None and not _fits_in_memory(info, image_size, cache_limit_bytes):
        stream = images.shuffle(min(shuffle_buffer, info.num_examples), seed=seed, reshuffle_each_iteration=True)
        stream = stream.repeat().batch(batch_size, drop_remainder=True)
        return stream.skip(start_step).prefetch(tf.data.AUTOTUNE)

    all_images, all_labels = info.decoded if info.decoded is not None else _decode_all(images)
    first_epoch, skip_batches = divmod(start_step, steps_per_epoch)
    used_per_epoch = steps_per_epoch * batch_size  # drop_remainder: the rest of the permutation is unused

    def epoch_order(epoch):
        keys = tf.random.stateless_uniform([info.num_examples], seed=tf.stack([tf.cast(seed, tf.int64), epoch]))
        return tf.data.Dataset.from_tensor_slices(tf.argsort(keys)[:used_per_epoch])

    indices = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch_order)
    batches = indices.skip(skip_batches * batch_size).batch(batch_size, drop_remainder=True)
    batches = batches.map(
        lambda index: (tf.gather(all_images, index), tf.gather(all_labels, index)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return batches.prefetch(tf.data.AUTOTUNE)


def evaluation_batches(images, info, batch_size, image_size, cache_limit_bytes=DEFAULT_CACHE_LIMIT_BYTES):
    """Every example once, in order, in batches (the last one may be smaller)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got batch_size={batch_size!r}.")
    # An image folder decoded into memory by load_images (info.decoded) needs no second copy.
    if info.decoded is None and _fits_in_memory(info, image_size, cache_limit_bytes):
        images = images.cache()
    return images.batch(batch_size).prefetch(tf.data.AUTOTUNE)
