"""Shared fixtures: small class-balanced subsets of the offline CIFAR-10 image folder.

The suite reads CIFAR-10 through the package's own local-copy override, SIMCLR_KERAS_LOCAL_DATA
(simclr_keras.dataset_sources): a folder holding cifar10/ (or the cifar10 folder itself), as an
image folder of train/<class>/*.jpg and test/<class>/*.jpg. Unset, it is set here to the development
machines' offline copy beside the repository, ../shared/datasets/cifar10, so that subprocesses see it
too. No test downloads anything.
"""

import os
import shutil
import subprocess
import sys

import pytest
import tensorflow as tf

from simclr_keras import dataset_sources

# Two logical CPU devices for the multi-replica tests (tests/test_distribute.py). This must happen
# before TensorFlow initialises its devices, i.e. here, before any test module runs. Single-device
# code keeps running on the first one.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault(dataset_sources.LOCAL_DATA_ENV, os.path.join(REPO_ROOT, "..", "shared", "datasets", "cifar10"))
CIFAR10_DIR = dataset_sources.local_copy("cifar10") or os.environ[dataset_sources.LOCAL_DATA_ENV]


def make_cifar10_subset(destination, train_per_class, test_per_class):
    """Copies the first images of each class into destination/{train,test}/<class>/."""
    if not os.path.isdir(os.path.join(CIFAR10_DIR, "train")):
        raise FileNotFoundError(
            f"the offline CIFAR-10 image folder is missing at {CIFAR10_DIR}; set {dataset_sources.LOCAL_DATA_ENV} "
            "to a folder holding cifar10/train/<class>/*.jpg and cifar10/test/<class>/*.jpg"
        )
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        for class_name in sorted(os.listdir(os.path.join(CIFAR10_DIR, split))):
            source = os.path.join(CIFAR10_DIR, split, class_name)
            target = os.path.join(destination, split, class_name)
            os.makedirs(target, exist_ok=True)
            for name in sorted(os.listdir(source))[:per_class]:
                shutil.copy(os.path.join(source, name), target)
    return str(destination)


@pytest.fixture(scope="session")
def cifar10_500(tmp_path_factory):
    """500 training images (50 per class) and 100 test images (10 per class)."""
    return make_cifar10_subset(tmp_path_factory.mktemp("cifar10_500"), 50, 10)


@pytest.fixture(scope="session")
def cifar_100_images(tmp_path_factory):
    """100 training images (10 per class), 20 test images."""
    return make_cifar10_subset(tmp_path_factory.mktemp("cifar10_100"), 10, 2)


def run_train_main(*flags):
    """`python -m simclr_keras.train FLAGS`, run in this process: (exit status, stdout, stderr).

    Parses the flags into absl's global FLAGS (undone afterwards) and calls `train.main` as
    `absl.app.run` would; SystemExit becomes the status. No TensorFlow start-up per call.
    """
    import contextlib
    import io

    from absl import flags as absl_flags

    from simclr_keras import train

    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        argv = absl_flags.FLAGS(["simclr_keras.train", *flags])
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                status = train.main(argv) or 0
            except SystemExit as exit:
                status = exit.code
    finally:
        absl_flags.FLAGS.unparse_flags()
    return status, stdout.getvalue(), stderr.getvalue()


# The bad files of the `bad_folder` fixture, by name, with the reason TensorFlow 2.21 gives.
BAD_FILES = {
    "random_bytes.jpg": "Unknown image file format",
    "zero_bytes.jpg": "Input is empty",
    "truncated.jpg": "Invalid JPEG data",
    "text_named.png": "Unknown image file format",
    "truncated.png": "Invalid PNG data",
}


def _png(array):
    return tf.io.encode_png(array).numpy()


@pytest.fixture(scope="session")
def bad_folder(tmp_path_factory):
    """train/: airplane and cat (12 real JPEGs each) plus every kind of awkward file; test/: 4 per class.

    Decodable oddities: grayscale, palette, RGBA and 16-bit PNGs, a 300x7 image, one nested two
    folders deep, an animated GIF; an empty class folder; a text file; and the BAD_FILES.
    Returns (root, {"gray": the grayscale array, "rgba": the RGBA array}).
    """
    import numpy as np
    from PIL import Image  # matplotlib's dependency; here only to write palette PNGs and a GIF

    root = tmp_path_factory.mktemp("bad_folder")
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("test", 4)):
        for class_name in ("airplane", "cat"):
            os.makedirs(root / split / class_name)
            source = os.path.join(CIFAR10_DIR, split, class_name)
            for name in sorted(os.listdir(source))[:count]:
                shutil.copy(os.path.join(source, name), root / split / class_name)
    cat = root / "train" / "cat"
    jpeg = (cat / sorted(os.listdir(cat))[0]).read_bytes()
    png = _png(rng.integers(0, 256, (32, 32, 3), np.uint8))
    (cat / "random_bytes.jpg").write_bytes(rng.integers(0, 256, 400, np.uint8).tobytes())
    (cat / "zero_bytes.jpg").write_bytes(b"")
    (cat / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (cat / "text_named.png").write_bytes(b"not a picture at all")
    (cat / "truncated.png").write_bytes(png[: len(png) // 2])
    (cat / "notes.txt").write_text("not an image, and not named like one")

    airplane = root / "train" / "airplane"
    gray = rng.integers(0, 256, (32, 32, 1), np.uint8)
    rgba = rng.integers(0, 256, (32, 32, 4), np.uint8)
    (airplane / "gray.png").write_bytes(_png(gray))
    (airplane / "rgba.png").write_bytes(_png(rgba))
    (airplane / "sixteen_bit.png").write_bytes(_png(rng.integers(0, 65536, (32, 32, 3)).astype(np.uint16)))
    (airplane / "odd_size.png").write_bytes(_png(rng.integers(0, 256, (300, 7, 3), np.uint8)))
    palette = Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).convert("P")
    palette.save(airplane / "palette.png")
    frames = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)) for _ in range(2)]
    frames[0].save(airplane / "animated.gif", save_all=True, append_images=frames[1:])
    os.makedirs(airplane / "deeper" / "still")
    (airplane / "deeper" / "still" / "nested.png").write_bytes(png)
    os.makedirs(root / "train" / "empty_class")
    return str(root), {"gray": gray, "rgba": rgba}


@pytest.fixture(scope="session")
def bad_folder_run(bad_folder, tmp_path_factory):
    """A 3-step training run on `bad_folder` (in this process): (root, model_dir, (status, stdout, stderr))."""
    root, _ = bad_folder
    model_dir = str(tmp_path_factory.mktemp("bad_folder_run"))
    result = run_train_main(
        f"--dataset=folder:{root}", f"--model_dir={model_dir}", "--train_steps=3", "--checkpoint_every_n_steps=100",
        "--batch_size=8", "--width_multiplier=0.125", "--optimizer=sgd", "--eval_batch_size=50",
    )  # fmt: skip
    return root, model_dir, result


# The flags of `tiny_run_dir`: a width-0.125 ResNet-18, 3 steps of batch 64, a checkpoint at step 2 and 3.
TINY_RUN_FLAGS = (
    "--train_steps=3", "--batch_size=64", "--width_multiplier=0.125", "--checkpoint_every_n_steps=2",
    "--eval_batch_size=100", "--seed=0",
)  # fmt: skip


@pytest.fixture(scope="session")
def tiny_run_dir(cifar10_500, tmp_path_factory):
    """One tiny training run made by the command line, shared by the CLI, evaluation and export tests.

    `python -m simclr_keras.train` with TINY_RUN_FLAGS on `cifar10_500`, exporting at the end. Returns a
    SimpleNamespace: data_dir (the folder), model_dir, export_dir (holding version 1), export_version_dir,
    flags (the command's flags), stdout, stderr. Treat it as read-only: a test that trains on, damages or
    exports into it copies it first (shutil.copytree), since the other tests see the same directory.
    """
    import types

    root = tmp_path_factory.mktemp("tiny_run")
    model_dir, export_dir = str(root / "run"), str(root / "exports")
    flags = [
        f"--dataset=folder:{cifar10_500}", f"--model_dir={model_dir}", f"--export_dir={export_dir}", *TINY_RUN_FLAGS
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "simclr_keras.train", *flags], capture_output=True, text=True, timeout=600, cwd=REPO_ROOT
    )
    assert result.returncode == 0, f"the tiny training run failed:\n{result.stderr[-4000:]}"
    return types.SimpleNamespace(
        data_dir=cifar10_500, model_dir=model_dir, export_dir=export_dir,
        export_version_dir=os.path.join(export_dir, "1"), flags=tuple(flags), stdout=result.stdout,
        stderr=result.stderr,
    )  # fmt: skip


def read_png(path):
    """Decodes a PNG file (uint8 [H, W, C]) and checks it is a picture, not a blank canvas."""
    with open(path, "rb") as file:
        image = tf.io.decode_png(file.read()).numpy()
    assert image.ndim == 3 and image.shape[2] in (3, 4), image.shape
    assert image[..., :3].std() > 0, f"{path} is blank"
    return image


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds; `pytest -m 'not slow'` leaves it out")
    config.addinivalue_line("markers", "bfloat16: runs bfloat16 kernels (see conftest.bfloat16_kernels_emulated)")


def _cpu_flags():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            return next((line.split(":", 1)[1].split() for line in file if line.startswith("flags")), [])
    except OSError:
        return []


def bfloat16_kernels_emulated():
    """True when ONEDNN_MAX_CPU_ISA caps oneDNN below AVX-512 on a CPU that has it.

    TensorFlow decides whether bfloat16 ops go to oneDNN from the CPU itself (AVX512F), not from that
    cap, so there they reach a oneDNN that has no bfloat16 kernel left and fail ("could not create a
    primitive descriptor"). A real CPU without AVX-512 runs them with TensorFlow's own (Eigen) kernels
    instead, which is what TF_ENABLE_ONEDNN_OPTS=0 selects: the bfloat16 tests run that way there.
    """
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    return (
        bool(isa)
        and "AVX512" not in isa
        and isa not in ("ALL", "DEFAULT")
        and os.environ.get("TF_ENABLE_ONEDNN_OPTS") != "0"
        and "avx512f" in _cpu_flags()
    )


def _run_in_subprocess_without_onednn(item):
    environment = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "0"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", item.nodeid]
    result = subprocess.run(command, cwd=item.config.rootpath, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, f"{item.nodeid} with TF_ENABLE_ONEDNN_OPTS=0:\n{result.stdout[-4000:]}"


def pytest_collection_modifyitems(config, items):
    if not bfloat16_kernels_emulated():
        return
    for item in items:
        if item.get_closest_marker("bfloat16"):
            item.runtest = lambda item=item: _run_in_subprocess_without_onednn(item)


def run_evaluate_main(capsys, *flags):
    """`python -m simclr_keras.evaluate FLAGS` in this process, on a private absl FlagValues:
    (exit status, stdout, stderr) as pytest's `capsys` captured them."""
    from absl import flags as absl_flags

    from simclr_keras import evaluate

    flag_values = absl_flags.FlagValues()
    evaluate.define_flags(flag_values)
    argv = flag_values(["simclr_keras.evaluate", *flags])
    try:
        evaluate.main(argv, flag_values)
        status = 0
    except SystemExit as exit:
        status = exit.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err
