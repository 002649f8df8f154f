"""tf.data pipelines of uint8 images (and labels) from TFDS datasets or an image folder.

Augmentation is not done here: `SimCLR.train_step` makes the views, so the same pipeline feeds
pretraining, the online probe's evaluation and later protocols.

Images keep their own resolution, as in the official code, which crops from the decoded image and
resizes only the crop: `image_size` (the side of the views) resizes nothing here. A dataset whose
images all have one size (CIFAR, STL-10) yields them as uint8 [H, W, 3]. Images of different
sizes (ImageNet, folders of photos) are yielded as a padded element {"images": uint8 [Hc, Wc, 3],
the image in its top-left corner, "image_shapes": int32 [2], its height and width}, so that they
batch into fixed shapes that `SimCLRAugmentation` crops per image; the canvas (Hc, Wc) is the
largest size in the split. Images whose longer side exceeds `max_source_size` (default 512, or
the view size if larger) are first downscaled to it, aspect ratio kept (antialiased bicubic): a
bound on the canvas and on the memory of a batch, where the official code crops from any size.

Dataset names:
  - TFDS: "cifar10", "cifar100", "stl10", "imagenet2012": a local copy named by $SIMCLR_KERAS_LOCAL_DATA,
    or TFDS's copy in `data_dir`, downloaded and prepared on first use (simclr_keras.dataset_sources).
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

from simclr_keras import dataset_sources
from simclr_keras.dataset_sources import TFDS_DATASETS, DatasetNotFoundError

FOLDER_PREFIX = "folder:"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
# Split folders whose images need no class folder (the others' subfolders must be classes of train/).
UNLABELED_SPLITS = ("unlabeled", "unlabelled")
# Keep decoded images in memory when they take less than this (CIFAR-10 train at 32 px: 150 MB).
DEFAULT_CACHE_LIMIT_BYTES = 4 * 1024**3
# Longer side above which an image is downscaled (aspect ratio kept) before it is stored or batched.
DEFAULT_MAX_SOURCE_SIZE = 512
# Keys of a padded element; the same as simclr_keras.augment.PADDED_IMAGES and IMAGE_SHAPES.
PADDED_IMAGES = "images"
IMAGE_SHAPES = "image_shapes"


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
    # (images, labels int64 [N]) tensors when the folder split was decoded into memory, images as
    # the elements (uint8 [N, H, W, 3] or a padded dict); `training_batches` uses them.
    decoded: tuple = dataclasses.field(default=None, compare=False, repr=False)
    # (height, width) of every element's image tensor (the canvas of padded elements); None: unknown.
    image_shape: tuple = None
    # Whether elements are padded dicts {"images", "image_shapes"} (images of different sizes).
    padded: bool = False


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


def _decode(path):
    return tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)


def _limit_size(image, max_side):
    """uint8 [h, w, 3] with max(h, w) <= max_side: larger images are downscaled, aspect ratio kept."""
    shape = tf.shape(image)
    longer = tf.maximum(shape[0], shape[1])

    def downscale():
        scale = tf.cast(max_side, tf.float32) / tf.cast(longer, tf.float32)
        size = tf.maximum(tf.cast(tf.math.rint(tf.cast(shape[:2], tf.float32) * scale), tf.int32), 1)
        size = tf.minimum(size, max_side)
        resized = tf.image.resize(image, size, method="bicubic", antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)

    return tf.cond(longer > max_side, downscale, lambda: image)


def _to_element(image, canvas_shape, padded):
    """The dataset element of one uint8 image: itself (every image has `canvas_shape`) or padded."""
    if not padded:
        return tf.ensure_shape(image, (*canvas_shape, 3))
    shape = tf.shape(image)[:2]
    canvas = tf.pad(image, [[0, canvas_shape[0] - shape[0]], [0, canvas_shape[1] - shape[1]], [0, 0]])
    return {PADDED_IMAGES: tf.ensure_shape(canvas, (*canvas_shape, 3)), IMAGE_SHAPES: tf.cast(shape, tf.int32)}


def _decode_error(path):
    """TensorFlow's one-line reason why the file at `path` does not decode as an image."""
    try:
        tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    except tf.errors.OpError as error:
        # Eager op errors read "{{function_node ...}} <reason> [Op:DecodeImage] name: ".
        message = re.sub(r"\{\{[^}]*\}\}", "", error.message).split("[Op:")[0].strip()
        return message.splitlines()[0] if message else type(error).__name__
    return "it failed to decode once but decodes now (was it being written?)"


def _decode_folder(paths, max_side, cache_limit_bytes):
    """Decodes every file once, in a parallel tf.data pass: (indices that decode, shapes, images).

    `ignore_errors` drops the files that fail without saying which, so each element carries its
    index and the indices missing from the result are the bad files. `shapes` is int [n, 2] (after
    `_limit_size`); `images` the n uint8 arrays at those sizes while they take at most
    `cache_limit_bytes`, else None (the pass was then only the check).
    """

    def decode(index, path):
        image = _limit_size(_decode(path), max_side)
        return index, image, tf.shape(image)[:2]

    indexed = tf.data.Dataset.from_tensor_slices((np.arange(len(paths), dtype=np.int64), paths))
    decoded = indexed.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
    indices, shapes, images, stored_bytes = [], [], [], 0
    for index_batch, image_batch, shape_batch in decoded.padded_batch(256).prefetch(2).as_numpy_iterator():
        indices.extend(index_batch.tolist())
        shapes.extend(shape_batch.tolist())
        if images is not None:
            stored_bytes += int(np.prod(shape_batch, axis=1).sum()) * 3
            if stored_bytes > cache_limit_bytes:
                images = None  # too large for memory: stream the files instead
            else:
                images.extend(image[:height, :width].copy() for image, (height, width) in zip(image_batch, shape_batch))
    return indices, np.asarray(shapes, np.int64).reshape(-1, 2), images


def _stack_in_canvas(images, canvas_shape, padded):
    """uint8 [N, Hc, Wc, 3] (or the padded dict) of a list of uint8 arrays, filled in place."""
    canvas = np.zeros((len(images), *canvas_shape, 3), np.uint8)
    for index, image in enumerate(images):
        canvas[index, : image.shape[0], : image.shape[1]] = image
    if not padded:
        return tf.constant(canvas)
    shapes = np.asarray([image.shape[:2] for image in images], np.int32)
    return {PADDED_IMAGES: tf.constant(canvas), IMAGE_SHAPES: tf.constant(shapes)}


def _folder_dataset(root, split, max_side, max_examples, strict, cache_limit_bytes):
    ignored = []
    paths, labels, class_names = list_image_folder(root, split, ignored)
    if max_examples:
        paths, labels = paths[:max_examples], labels[:max_examples]
    kept, shapes, images = _decode_folder(paths, max_side, cache_limit_bytes)
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

    canvas_shape = tuple(int(side) for side in shapes.max(axis=0))
    padded = bool(np.any(shapes != shapes[:1]))
    decoded = None
    if images is not None and len(images) * canvas_shape[0] * canvas_shape[1] * 3 <= cache_limit_bytes:
        decoded = (_stack_in_canvas(images, canvas_shape, padded), tf.constant(label_array))
        dataset = tf.data.Dataset.from_tensor_slices(decoded)
    else:
        dataset = tf.data.Dataset.from_tensor_slices((paths, label_array)).map(
            lambda path, label: (_to_element(_limit_size(_decode(path), max_side), canvas_shape, padded), label),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        if not strict:
            # Every file decoded above; one that breaks later (changed on disk) must not end the run.
            dataset = dataset.ignore_errors(log_warning=True)
    info = DatasetInfo(
        len(paths), len(class_names) if has_labels else 0, class_names, skipped, tuple(notes), decoded,
        canvas_shape, padded,
    )  # fmt: skip
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


def _tfds_dataset(builder, split, max_side, max_examples):
    try:
        dataset = builder.as_dataset(split=split, shuffle_files=False)
    except Exception as error:  # tfds raises several types for "no such split"
        raise DatasetNotFoundError(
            f"--dataset={builder.name} has no split '{split}' in {builder.data_dir} ({type(error).__name__}); "
            f"its splits are {sorted(builder.info.splits)}."
        ) from None
    num_examples = int(dataset.cardinality())
    if num_examples < 0:  # unknown cardinality: count once (split metadata is missing)
        num_examples = int(dataset.reduce(0, lambda count, _: count + 1))
    label_feature = builder.info.features["label"]
    class_names = tuple(label_feature.names)
    if max_examples:
        dataset = dataset.take(max_examples)
        num_examples = min(num_examples, max_examples)
    height, width = builder.info.features["image"].shape[:2]
    # One size for every image (CIFAR, STL-10): as they are. Otherwise (ImageNet): padded canvases.
    padded = height is None or width is None or max(height, width) > max_side
    canvas_shape = (max_side, max_side) if padded else (height, width)
    dataset = dataset.map(
        lambda example: (
            _to_element(_limit_size(example["image"], max_side), canvas_shape, padded),
            example["label"],
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    info = DatasetInfo(num_examples, len(class_names), class_names, image_shape=canvas_shape, padded=padded)
    return dataset, info


def check_dataset(dataset, splits):
    """Raises DatasetNotFoundError, as load_images would, for an unknown dataset name or a folder
    split that is missing or holds no image files; reads nothing but folder listings."""
    folder = dataset[len(FOLDER_PREFIX):] if dataset.startswith(FOLDER_PREFIX) else None
    if dataset in TFDS_DATASETS:
        copy = dataset_sources.local_copy(dataset)
        folder = copy if copy and dataset_sources.is_image_folder(copy) else None
    if folder:
        for split in splits:
            list_image_folder(folder, split)
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
    max_source_size=DEFAULT_MAX_SOURCE_SIZE,
):
    """Returns (tf.data.Dataset of (image, int64 label), DatasetInfo), unbatched, in file order.

    Images are uint8 [H, W, 3] at their own resolution, or padded elements for images of different
    sizes (see the module docstring and `info.padded`); none is larger than
    max(`max_source_size`, `image_size`) on its longer side. An image folder split is decoded once
    here: files that do not decode are left out and listed in `info.skipped_files`, or, with
    `strict`, raise InvalidImageError. When its images take at most `cache_limit_bytes` they stay
    in memory (`info.decoded`). `max_examples` counts files before the bad ones are left out.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got image_size={image_size!r}.")
    if max_examples < 0:
        raise ValueError(f"max_examples must be >= 0 (0: all), got max_examples={max_examples!r}.")
    if isinstance(max_source_size, bool) or not isinstance(max_source_size, (int, np.integer)) or max_source_size < 1:
        raise ValueError(f"max_source_size must be a positive integer, got max_source_size={max_source_size!r}.")
    max_side = int(max(max_source_size, image_size))
    if dataset.startswith(FOLDER_PREFIX):
        return _folder_dataset(
            dataset[len(FOLDER_PREFIX):], split, max_side, max_examples, strict, cache_limit_bytes
        )
    if dataset in TFDS_DATASETS:
        source = dataset_sources.source_of(dataset, data_dir)
        if isinstance(source, str):  # a local copy as an image folder
            return _folder_dataset(source, split, max_side, max_examples, strict, cache_limit_bytes)
        return _tfds_dataset(source, split, max_side, max_examples)
    raise DatasetNotFoundError(
        f"unknown dataset {dataset!r}; expected one of {list(TFDS_DATASETS)} or folder:DIR."
    )


def _fits_in_memory(info, image_size, cache_limit_bytes):
    height, width = info.image_shape or (image_size, image_size)
    return info.num_examples * height * width * 3 <= cache_limit_bytes


def _decode_all(images):
    """Decodes a dataset of (image, label) once into numpy arrays (image elements may be dicts)."""
    batches = list(images.batch(1024).prefetch(2).as_numpy_iterator())
    return tf.nest.map_structure(lambda *blocks: np.concatenate(blocks), *batches)


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
        lambda index: (tf.nest.map_structure(lambda part: tf.gather(part, index), all_images), tf.gather(all_labels, index)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    # Endless (epochs up to int64 max), which flat_map hides: said here, tf.distribute skips its
    # partial-batch handling, and the per-replica batch keeps a static size under multi-worker
    # training (micro-batching with synchronized BatchNorm needs it; models/gradient_cache.py).
    batches = batches.apply(tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))
    return batches.prefetch(tf.data.AUTOTUNE)


def evaluation_batches(images, info, batch_size, image_size, cache_limit_bytes=DEFAULT_CACHE_LIMIT_BYTES):
    """Every example once, in order, in batches (the last one may be smaller)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got batch_size={batch_size!r}.")
    # An image folder decoded into memory by load_images (info.decoded) needs no second copy.
    if info.decoded is None and _fits_in_memory(info, image_size, cache_limit_bytes):
        images = images.cache()
    return images.batch(batch_size).prefetch(tf.data.AUTOTUNE)
