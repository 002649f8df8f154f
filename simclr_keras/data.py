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
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf

FOLDER_PREFIX = "folder:"
TFDS_DATASETS = ("cifar10", "cifar100", "stl10", "imagenet2012")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# Keep decoded images in memory when they take less than this (CIFAR-10 train at 32 px: 150 MB).
DEFAULT_CACHE_LIMIT_BYTES = 4 * 1024**3


class DatasetNotFoundError(ValueError):
    """The dataset or split cannot be read; the message says what to pass instead."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    num_examples: int
    num_classes: int  # 0 when the split has no labels
    class_names: tuple


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


def list_image_folder(root, split):
    """Lists (paths, labels, class_names) of one split ("train", "test", "train+unlabeled") of a folder.

    Files are ordered round-robin over classes (the first image of each class, then the second, ...),
    so that any prefix of the list, e.g. the first 500 for --max_train_examples=500, is class-balanced.
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
            if label is None:
                raise DatasetNotFoundError(
                    f"--dataset=folder:{root}: class folder {split_name}/{top} does not exist in train/ "
                    f"(classes are {list(class_names)})."
                )
            per_class.setdefault(label, []).extend(
                os.path.join(directory, name) for name in sorted(files) if _is_image(name)
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


def _folder_dataset(root, split, image_size, max_examples):
    paths, labels, class_names = list_image_folder(root, split)
    if max_examples:
        paths, labels = paths[:max_examples], labels[:max_examples]
    dataset = tf.data.Dataset.from_tensor_slices((paths, np.asarray(labels, np.int64)))
    dataset = dataset.map(
        lambda path, label: _decode_and_resize(path, label, image_size),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    has_labels = any(label >= 0 for label in labels)
    return dataset, DatasetInfo(len(paths), len(class_names) if has_labels else 0, class_names)


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


def load_images(dataset, split, image_size, data_dir=None, max_examples=0):
    """Returns (tf.data.Dataset of (uint8 [S, S, 3], int64 label), DatasetInfo), unbatched, in file order."""
    if dataset.startswith(FOLDER_PREFIX):
        return _folder_dataset(dataset[len(FOLDER_PREFIX):], split, image_size, max_examples)
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
    skips the batches already seen.
    """
    steps_per_epoch = info.num_examples // batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"batch_size={batch_size} is larger than the {info.num_examples} training images; "
            "use a smaller --batch_size or more data."
        )
    if not _fits_in_memory(info, image_size, cache_limit_bytes):
        stream = images.shuffle(min(shuffle_buffer, info.num_examples), seed=seed, reshuffle_each_iteration=True)
        stream = stream.repeat().batch(batch_size, drop_remainder=True)
        return stream.skip(start_step).prefetch(tf.data.AUTOTUNE)

    all_images, all_labels = _decode_all(images)
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
    if _fits_in_memory(info, image_size, cache_limit_bytes):
        images = images.cache()
    return images.batch(batch_size).prefetch(tf.data.AUTOTUNE)
