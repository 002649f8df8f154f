"""Datasets the TensorFlow way: TFDS downloads and prepares on first use, the local-copy override, and
the offline error, all tested with nothing beyond 127.0.0.1.

The download tests serve a small CIFAR-10 archive in the real format from 127.0.0.1
(tests/local_cifar_source.py) and point TFDS's cifar10 builder at it, with the archive's checksum
registered: TFDS's own download manager, checksum check, extraction and preparation all run. The
offline test sends the real download address through a proxy on a closed loopback port.
The expected pixels are those written into the archive's binary records, not what TFDS returns.
"""

import glob
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

import local_cifar_source
from simclr_keras import data, dataset_sources, prepare_data

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def sorted_examples(images, labels):
    """(label, pixels) pairs in a canonical order: TFDS stores examples in its own shuffled order."""
    return sorted(zip(np.asarray(labels).tolist(), (np.asarray(image).tobytes() for image in images)))


def read_split(dataset, split, data_dir=None):
    images, info = data.load_images(dataset, split, image_size=32, data_dir=data_dir)
    pairs = list(images.as_numpy_iterator())
    return sorted_examples([image for image, _ in pairs], [label for _, label in pairs]), info


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    path = tmp_path_factory.mktemp("source") / local_cifar_source.ARCHIVE_NAME
    splits = local_cifar_source.write_archive(path)
    return path, {split: sorted_examples(*pair) for split, pair in splits.items()}


@pytest.fixture
def server(archive, monkeypatch):
    """The archive on 127.0.0.1, TFDS's cifar10 pointed at it, and no local-copy override."""
    monkeypatch.delenv(dataset_sources.LOCAL_DATA_ENV, raising=False)
    with local_cifar_source.ArchiveServer(archive[0]) as running:
        local_cifar_source.redirect_cifar10(monkeypatch.setattr, running.url, running.content)
        yield running


@pytest.fixture(scope="module")
def prepared_tfds_dir(archive, tmp_path_factory):
    """A TFDS data_dir holding cifar10 prepared from the local archive (then the server is gone)."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    with pytest.MonkeyPatch.context() as patch, local_cifar_source.ArchiveServer(archive[0]) as running:
        patch.delenv(dataset_sources.LOCAL_DATA_ENV, raising=False)
        local_cifar_source.redirect_cifar10(patch.setattr, running.url, running.content)
        dataset_sources.prepared_builder("cifar10", data_dir)
    return data_dir


def test_cifar10_downloads_and_prepares_on_first_use_then_is_read_without_network(server, archive, tmp_path):
    data_dir = str(tmp_path / "tfds")
    train, info = read_split("cifar10", "train", data_dir)
    assert train == archive[1]["train"]
    assert info.class_names == tuple(local_cifar_source.CLASS_NAMES)  # from batches.meta.txt
    assert server.requests["GET"] == 1
    requests_before = dict(server.requests)
    test, _ = read_split("cifar10", "test", data_dir)  # prepared: no request at all
    assert test == archive[1]["test"]
    assert server.requests == requests_before


def test_an_interrupted_download_fails_in_one_line_and_the_rerun_downloads_afresh(server, archive, tmp_path):
    data_dir = str(tmp_path / "tfds")
    server.mode = "cut"
    with pytest.raises(dataset_sources.DatasetDownloadError) as failure:
        data.load_images("cifar10", "train", image_size=32, data_dir=data_dir)
    message = str(failure.value)
    assert "\n" not in message and "could not be downloaded" in message and "Rerun" in message
    assert not os.path.exists(os.path.join(data_dir, "cifar10", "3.0.2"))  # nothing that looks prepared
    assert glob.glob(os.path.join(data_dir, "downloads", "cifar10", "*.tmp.*"))  # TFDS's partial download

    server.mode = "whole"
    train, _ = read_split("cifar10", "train", data_dir)
    assert train == archive[1]["train"]
    assert server.requests["GET"] == 2
    assert not glob.glob(os.path.join(data_dir, "downloads", "cifar10", "*.tmp.*"))  # the partial one removed


def test_a_preparation_killed_midway_is_never_read_and_the_rerun_prepares_it(server, archive, tmp_path):
    data_dir, started = str(tmp_path / "tfds"), tmp_path / "generating"
    # The child downloads through TFDS, then stalls in example generation, where it is killed.
    code = (
        "import os, time, local_cifar_source\n"
        "from tensorflow_datasets.image_classification import cifar\n"
        "local_cifar_source.redirect_from_environment()\n"
        "generate = cifar.Cifar10._generate_examples\n"
        "def stalled(self, *args):\n"
        "    for count, (key, example) in enumerate(generate(self, *args)):\n"
        "        if count == 3:\n"
        f"            open({str(started)!r}, 'w').close(); time.sleep(600)\n"
        "        yield key, example\n"
        "cifar.Cifar10._generate_examples = stalled\n"
        "from simclr_keras import dataset_sources\n"
        f"dataset_sources.prepared_builder('cifar10', {data_dir!r})\n"
    )
    env = dict(os.environ, PYTHONPATH=TESTS_DIR, TEST_CIFAR10_URL=server.url, TEST_CIFAR10_ARCHIVE=str(archive[0]))
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not started.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert started.exists(), child.stderr.read().decode()[-3000:] if child.poll() is not None else "no progress"
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stderr.close()

    import tensorflow_datasets as tfds

    assert not tfds.builder("cifar10", data_dir=data_dir).is_prepared()
    assert glob.glob(os.path.join(data_dir, "cifar10", "incomplete.*"))  # the half-written folder
    train, _ = read_split("cifar10", "train", data_dir)
    assert train == archive[1]["train"]
    assert not glob.glob(os.path.join(data_dir, "cifar10", "incomplete.*"))


def _closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_offline_the_readme_command_stops_in_seconds_with_one_line_naming_the_override(tmp_path):
    proxy = f"http://127.0.0.1:{_closed_port()}"  # every download goes here, and nothing answers
    env = {k: v for k, v in os.environ.items() if k not in (dataset_sources.LOCAL_DATA_ENV, "NO_PROXY", "no_proxy")}
    env.update(TFDS_DATA_DIR=str(tmp_path / "tfds"), HTTPS_PROXY=proxy, HTTP_PROXY=proxy, https_proxy=proxy, http_proxy=proxy)
    started = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "simclr_keras.train", "--flagfile=configs/quickstart.flags", f"--model_dir={tmp_path / 'run'}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    seconds = time.time() - started
    assert seconds < 60, f"took {seconds:.0f} s"  # TFDS alone retries for over 3 minutes
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(errors) == 1, result.stderr[-3000:]
    assert dataset_sources.LOCAL_DATA_ENV in errors[0] and "Connection refused" in errors[0]
    assert "https://www.cs.toronto.edu/" in errors[0]  # TFDS's own address for CIFAR-10


def test_the_override_reads_an_image_folder_copy_without_network(cifar_100_images, monkeypatch, tmp_path):
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{_closed_port()}")
    expected, _ = read_split(f"folder:{cifar_100_images}", "train")
    root = tmp_path / "copies"
    root.mkdir()
    os.symlink(cifar_100_images, root / "cifar10")
    for override in (root, root / "cifar10"):  # ROOT holding cifar10/, or the cifar10 folder itself
        monkeypatch.setenv(dataset_sources.LOCAL_DATA_ENV, str(override))
        data.check_dataset("cifar10", ["train", "test"])
        assert read_split("cifar10", "train", data_dir=str(tmp_path / "empty"))[0] == expected
    assert not (tmp_path / "empty").exists()  # TFDS was never asked


def test_the_override_reads_a_prepared_tfds_directory_without_network(prepared_tfds_dir, archive, monkeypatch, tmp_path):
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv(dataset_sources.LOCAL_DATA_ENV, prepared_tfds_dir)
    assert read_split("cifar10", "test", data_dir=str(tmp_path / "empty"))[0] == archive[1]["test"]
    monkeypatch.setenv(dataset_sources.LOCAL_DATA_ENV, str(tmp_path))
    (tmp_path / "cifar10").mkdir()  # neither layout: said in one line
    with pytest.raises(dataset_sources.DatasetNotFoundError, match="neither an image folder"):
        data.load_images("cifar10", "test", image_size=32)


def test_imagenet_without_its_archives_says_which_files_go_where(tmp_path):
    import tensorflow_datasets as tfds

    manual_dir = tmp_path / "downloads" / "manual"
    manual_dir.mkdir(parents=True)
    (manual_dir / "ILSVRC2012_img_val.tar").write_bytes(b"")  # one of the two archives is there
    with pytest.raises(dataset_sources.DatasetDownloadError) as failure:
        dataset_sources.prepared_builder("imagenet2012", str(tmp_path))
    message = str(failure.value)
    assert "(missing: ILSVRC2012_img_train.tar)" in message
    # TFDS's own instructions name the files its manual route expects.
    instructions = tfds.builder("imagenet2012", data_dir=str(tmp_path)).MANUAL_DOWNLOAD_INSTRUCTIONS
    for file in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
        assert file in instructions and file in message
    assert os.path.join(str(tmp_path), "downloads", "manual") in message and "\n" not in message


def test_prepare_data_writes_the_image_folder_that_folder_datasets_read(prepared_tfds_dir, archive, monkeypatch, tmp_path):
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.delenv(dataset_sources.LOCAL_DATA_ENV, raising=False)
    output = tmp_path / "cifar10_files"
    counts = prepare_data.prepare_image_folder("cifar10", str(output), prepared_tfds_dir)
    assert counts == {"test": 6, "train": 20}
    assert sorted(os.listdir(output)) == ["test", "train"]
    for split in ("train", "test"):
        files = sorted(glob.glob(str(output / split / "*" / "*.png")))
        labels = [local_cifar_source.CLASS_NAMES.index(os.path.basename(os.path.dirname(path))) for path in files]
        images = [tf.io.decode_png(tf.io.read_file(path)).numpy() for path in files]
        assert sorted_examples(images, labels) == archive[1][split]
        assert read_split(f"folder:{output}", split)[0] == archive[1][split]
    assert not os.path.exists(str(output) + prepare_data.INCOMPLETE_SUFFIX)


def test_prepare_data_command_refuses_a_folder_that_is_not_empty(tmp_path):
    (tmp_path / "taken.txt").write_text("x")
    result = subprocess.run(
        [sys.executable, "-m", "simclr_keras.prepare_data", "--dataset=cifar10", f"--output_dir={tmp_path}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1 and "not an empty folder" in errors[0], result.stderr[-2000:]
