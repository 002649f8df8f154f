"""Shared fixtures: small class-balanced subsets of the shared CIFAR-10 image folder."""

import os
import shutil

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
