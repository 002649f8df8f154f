"""Write a TFDS dataset out as an image folder, for people who want files.

    python -m simclr_keras.prepare_data --dataset=cifar10 --output_dir=data/cifar10

downloads and prepares the dataset through TFDS if needed (simclr_keras.dataset_sources), then writes
OUTPUT_DIR/<split>/<class>/<index>.<ext> for every split (images without a label, as STL-10's
unlabelled split, go directly into OUTPUT_DIR/<split>/): the layout `--dataset=folder:OUTPUT_DIR`,
`keras.utils.image_dataset_from_directory` and SIMCLR_KERAS_LOCAL_DATA read. Each file holds the
bytes TFDS stored (PNG for CIFAR and STL-10, JPEG for ImageNet), so pixels are not re-encoded.

The folder is written under OUTPUT_DIR.incomplete and renamed when every split is done: an
interrupted run never leaves a folder that looks complete, and a rerun starts it again.
Exit status: 0 done, 1 the dataset cannot be had or the folder cannot be written, 2 a bad flag.
"""

import os
import shutil
import sys

from absl import app, flags

from simclr_keras import dataset_sources
from simclr_keras.cli import fail, reject_positional_arguments

FLAGS = flags.FLAGS
INCOMPLETE_SUFFIX = ".incomplete"


def define_flags(flag_values=FLAGS):
    """Defined when the module runs, not on import: simclr_keras.train defines a --dataset and a
    --data_dir too, and both modules import into one process (the tests)."""
    flags.DEFINE_enum(
        "dataset", None, list(dataset_sources.TFDS_DATASETS), "The TFDS dataset to write out.", flag_values=flag_values
    )
    flags.DEFINE_string(
        "output_dir", None, "The image folder to create; must not exist yet (or be empty).", flag_values=flag_values
    )
    flags.DEFINE_string(
        "data_dir", None, "TFDS data directory (default: TFDS's own, honouring TFDS_DATA_DIR).", flag_values=flag_values
    )
    flags.DEFINE_list(
        "splits", None, "Splits to write (default: all of the dataset's), e.g. train,test.", flag_values=flag_values
    )
    flags.mark_flags_as_required(["dataset", "output_dir"], flag_values=flag_values)


def _extension(encoded):
    """The file extension of encoded image bytes, from their signature."""
    if encoded.startswith(b"\x89PNG"):
        return ".png"
    if encoded.startswith(b"\xff\xd8"):
        return ".jpg"
    raise ValueError(f"unknown image encoding (first bytes {encoded[:8]!r})")


def _folder_name(class_name):
    return class_name.replace(os.sep, "_")


def write_split(builder, split, split_dir):
    """Writes one split's images under `split_dir`, with a progress bar; returns how many."""
    import tensorflow_datasets as tfds
    from tqdm import tqdm

    class_names = [_folder_name(name) for name in builder.info.features["label"].names]
    examples = builder.as_dataset(split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})
    count = 0
    for example in tqdm(examples.as_numpy_iterator(), total=builder.info.splits[split].num_examples, desc=split, unit=" images"):
        label = int(example["label"])
        directory = os.path.join(split_dir, class_names[label]) if label >= 0 else split_dir
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"{count:07d}{_extension(example['image'])}"), "wb") as file:
            file.write(example["image"])
        count += 1
    return count


def prepare_image_folder(dataset, output_dir, data_dir=None, splits=None):
    """Writes `dataset` (a TFDS name) as an image folder at `output_dir`; returns {split: images}."""
    source = dataset_sources.source_of(dataset, data_dir)
    if isinstance(source, str):
        raise dataset_sources.DatasetNotFoundError(
            f"--dataset={dataset} is already an image folder, at {source} ({dataset_sources.LOCAL_DATA_ENV})."
        )
    splits = splits or sorted(source.info.splits)
    unknown = sorted(set(splits) - set(source.info.splits))
    if unknown:
        raise dataset_sources.DatasetNotFoundError(
            f"--splits: {dataset} has no split {unknown}; its splits are {sorted(source.info.splits)}."
        )
    staging = output_dir.rstrip(os.sep) + INCOMPLETE_SUFFIX
    shutil.rmtree(staging, ignore_errors=True)  # an interrupted earlier run
    counts = {split: write_split(source, split, os.path.join(staging, split)) for split in splits}
    os.replace(staging, output_dir)
    return counts


def main(argv, flag_values=FLAGS):
    reject_positional_arguments(argv)
    output_dir = flag_values.output_dir
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        fail(f"--output_dir={output_dir} already exists and is not an empty folder; pass a new folder.")
    try:
        counts = prepare_image_folder(flag_values.dataset, output_dir, flag_values.data_dir, flag_values.splits)
    except dataset_sources.DatasetNotFoundError as error:
        fail(str(error))
    except OSError as error:
        fail(f"--output_dir={output_dir} cannot be written ({error.strerror or error}); pass a writable folder.")
    written = ", ".join(f"{split} {count}" for split, count in counts.items())
    print(f"wrote {output_dir}: {written} images; read it with --dataset=folder:{output_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main)
