"""Shared fixtures: small class-balanced subsets of the shared CIFAR-10 image folder."""

import os
import shutil
import subprocess
import sys

import pytest
import tensorflow as tf

# Two logical CPU devices for the multi-replica tests (tests/test_distribute.py). This must happen
# before TensorFlow initialises its devices, i.e. here, before any test module runs. Single-device
# code keeps running on the first one.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR10_DIR = os.environ.get(
    "SIMCLR_CIFAR10_DIR", os.path.join(REPO_ROOT, "..", "shared", "datasets", "cifar10")
)


def make_cifar10_subset(destination, train_per_class, test_per_class):
    """Copies the first images of each class into destination/{train,test}/<class>/."""
    if not os.path.isdir(os.path.join(CIFAR10_DIR, "train")):
        raise FileNotFoundError(
            f"the shared CIFAR-10 image folder is missing at {CIFAR10_DIR}; set SIMCLR_CIFAR10_DIR to a "
            "folder holding train/<class>/*.jpg and test/<class>/*.jpg"
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
