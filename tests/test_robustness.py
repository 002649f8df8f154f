"""Issue 6: bad data, bad flags, non-finite losses and crashes never lose work or end in a traceback.

The command-line tests run `python -m simclr_keras.train` on a tiny encoder (width 0.125) and a few
real CIFAR-10 images, so that each run takes seconds.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from conftest import CIFAR10_DIR, make_cifar10_subset

from simclr_keras import callbacks, data, runs

TINY = ["--batch_size=16", "--width_multiplier=0.125", "--optimizer=sgd", "--learning_rate=0.5", "--eval_batch_size=50"]
# The bad files of the folder below, by name, with the reason TensorFlow 2.21 gives.
BAD_FILES = {
    "random_bytes.jpg": "Unknown image file format",
    "zero_bytes.jpg": "Input is empty",
    "truncated.jpg": "Invalid JPEG data",
    "text_named.png": "Unknown image file format",
    "truncated.png": "Invalid PNG data",
}


def run_module(module, *flags, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", module, *flags], capture_output=True, text=True, timeout=timeout
    )


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def read_log(model_dir):
    with open(os.path.join(model_dir, "train_log.jsonl"), encoding="utf-8") as file:
        return [json.loads(line) for line in file]


def latest_step(model_dir):
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    return int(latest.rsplit("-", 1)[-1]) if latest else None


def _png(array):
    return tf.io.encode_png(array).numpy()


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    """train/: airplane and cat (12 real JPEGs each) plus every kind of awkward file; test/: 4 per class.

    Decodable oddities: grayscale, palette, RGBA and 16-bit PNGs, a 300x7 image, one nested two
    folders deep, an animated GIF; an empty class folder; a text file; and the BAD_FILES.
    """
    from PIL import (
        Image,  # matplotlib's dependency; here only to write palette PNGs and a GIF
    )

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
        os.makedirs(os.path.dirname(tmp_path / path), exist_ok=True)
        (tmp_path / path).write_bytes(_png(np.zeros((4, 4, 3), np.uint8)))
    _, labels, _ = data.list_image_folder(str(tmp_path), "unlabeled")
    assert labels == [-1, -1]


@pytest.fixture(scope="module")
def bad_folder_run(bad_folder, tmp_path_factory):
    root, _ = bad_folder
    model_dir = str(tmp_path_factory.mktemp("bad_folder_run"))
    result = run_module(
        "simclr_keras.train", f"--dataset=folder:{root}", f"--model_dir={model_dir}", "--train_steps=3",
        "--checkpoint_every_n_steps=100", "--batch_size=8", "--width_multiplier=0.125", "--optimizer=sgd",
        "--eval_batch_size=50",
    )  # fmt: skip
    return root, model_dir, result


def test_cli_trains_on_the_bad_folder_and_reports_each_skipped_file(bad_folder_run):
    root, model_dir, result = bad_folder_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"warning: folder:{root} split 'train': skipped 5 file(s) that do not decode as images" in result.stderr
    for name in BAD_FILES:
        assert re.search(rf"^  \S+/train/cat/{re.escape(name)}: ", result.stderr, re.MULTILINE), name
    assert "31 training images" in result.stdout
    assert [record["step"] for record in read_log(model_dir)] == [1, 2, 3]
    with open(os.path.join(model_dir, "classes.json"), encoding="utf-8") as file:
        assert json.load(file)["class_names"] == ["airplane", "cat", "empty_class"]


@pytest.mark.parametrize("module", ["simclr_keras.train", "simclr_keras.evaluate"])
def test_strict_data_turns_a_bad_file_into_a_one_line_error(bad_folder_run, tmp_path, module):
    root, model_dir, _ = bad_folder_run
    if module == "simclr_keras.train":
        flags = [f"--model_dir={tmp_path}", "--train_steps=1", "--batch_size=8"]
    else:
        flags = [f"--model_dir={model_dir}", "--protocol=knn"]
    result = run_module(module, f"--dataset=folder:{root}", "--strict_data", *flags)
    assert result.returncode == 1
    [line] = error_lines(result.stderr)
    assert re.match(rf"error: --dataset=folder:{re.escape(root)}: \S+/train/cat/(\w+\.\w+) does not decode", line)
    assert re.search(r"/train/cat/(\w+\.\w+) does not", line).group(1) in BAD_FILES
    assert "Traceback" not in result.stderr


def _file_hashes(directory):
    return {
        name: hashlib.sha256((open(os.path.join(directory, name), "rb")).read()).hexdigest()
        for name in sorted(os.listdir(directory))
    }


def test_a_non_finite_loss_stops_training_and_keeps_the_last_checkpoint(bad_folder_run):
    _, model_dir, _ = bad_folder_run
    checkpoint_dir = os.path.join(model_dir, "checkpoints")
    before = _file_hashes(checkpoint_dir)
    assert latest_step(model_dir) == 3
    # A learning rate of 1e30 from the first resumed step: the weights explode within two steps.
    result = run_module(
        "simclr_keras.train", f"--flagfile={model_dir}/flags.txt", "--train_steps=20", "--learning_rate=1e30",
        "--warmup_epochs=0", "--checkpoint_every_n_steps=1",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    [line] = error_lines(result.stderr)
    match = re.fullmatch(r"error: non-finite (.*) at step (\d+); the last checkpoint \(step (\d+)\) is kept\. .*", line)
    assert match, line
    reason, bad_step, kept_step = match.group(1), int(match.group(2)), int(match.group(3))
    assert "loss" in reason or reason == "weights"
    assert kept_step < bad_step and latest_step(model_dir) == kept_step
    after = _file_hashes(checkpoint_dir)
    # Earlier checkpoints are untouched, and none was written at or after the bad step.
    assert all(after.get(name) == digest for name, digest in before.items() if name != "checkpoint")
    assert not any(re.match(rf"ckpt-{step}\.", name) for name in after for step in range(bad_step, 21))
    model = runs.load_model(model_dir)
    assert all(np.all(np.isfinite(weight)) for weight in model.get_weights())
    log = read_log(model_dir)  # still valid JSONL: NaN is written as null
    assert log[-1]["step"] <= bad_step and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def cifar_100_images(tmp_path_factory):
    """100 training images (10 per class), 20 test images."""
    return make_cifar10_subset(tmp_path_factory.mktemp("cifar10_100"), 10, 2)


def _wait_for_log_lines(process, model_dir, count, timeout=240):
    log_path = os.path.join(model_dir, "train_log.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        if os.path.exists(log_path):
            with open(log_path, encoding="utf-8") as file:
                if sum(1 for _ in file) >= count:
                    return
        time.sleep(0.05)
    raise AssertionError(f"no {count} log lines in {timeout} s")


def test_sigterm_saves_a_checkpoint_and_a_mixed_float16_rerun_resumes(cifar_100_images, tmp_path):
    model_dir = str(tmp_path / "run")
    command = [
        sys.executable, "-m", "simclr_keras.train", f"--dataset=folder:{cifar_100_images}", f"--model_dir={model_dir}",
        "--checkpoint_every_n_steps=1000", "--eval_split=", "--precision=mixed_float16", *TINY,
    ]  # fmt: skip
    process = subprocess.Popen(
        [*command, "--train_steps=500"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    _wait_for_log_lines(process, model_dir, 4)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    match = re.search(r"^stopped by SIGTERM at step (\d+); .* Rerun the same command to resume\.$", stderr, re.M)
    assert match, stderr[-3000:]
    stopped_at = int(match.group(1))
    assert latest_step(model_dir) == stopped_at >= 1 and "Traceback" not in stderr
    # mixed_float16: Keras wrapped the optimizer in a LossScaleOptimizer, whose scale is checkpointed.
    names = [name for name, _ in tf.train.list_variables(os.path.join(model_dir, "checkpoints", f"ckpt-{stopped_at}"))]
    assert any("dynamic_scale" in name for name in names) and any("random_states" in name for name in names)

    result = subprocess.run([*command, f"--train_steps={stopped_at + 2}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming at step {stopped_at}" in result.stdout
    assert read_log(model_dir)[-1]["step"] == stopped_at + 2 == latest_step(model_dir)


def test_kill_9_mid_training_resumes_from_the_last_checkpoint(cifar_100_images, tmp_path):
    model_dir = str(tmp_path / "run")
    command = [
        sys.executable, "-m", "simclr_keras.train", f"--dataset=folder:{cifar_100_images}", f"--model_dir={model_dir}",
        "--checkpoint_every_n_steps=4", "--train_steps=24", "--eval_split=", *TINY,
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_log_lines(process, model_dir, 10)  # past the checkpoint of step 8
    process.kill()  # SIGKILL: no handler runs
    process.communicate(timeout=60)
    checkpoint_step = latest_step(model_dir)
    logged_before = read_log(model_dir)
    killed_at = logged_before[-1]["step"]
    assert checkpoint_step is not None and 8 <= checkpoint_step <= killed_at < 24
    # As if the kill had cut the last line short: the rerun must drop the fragment.
    with open(os.path.join(model_dir, "train_log.jsonl"), "a", encoding="utf-8") as file:
        file.write('{"step": 999, "time": 17')

    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming at step {checkpoint_step}" in result.stdout
    log = read_log(model_dir)  # every line parses
    # The killed run's records after its checkpoint were dropped: each step is logged once.
    assert [record["step"] for record in log] == list(range(1, 25))
    assert latest_step(model_dir) == 24
    # Weights, optimizer, data order and the augmenter's random state all resumed: the redone steps
    # repeat the killed run's losses.
    redone = {record["step"]: record["loss"] for record in log}
    for record in logged_before[checkpoint_step:]:
        assert redone[record["step"]] == pytest.approx(record["loss"], rel=1e-4), record["step"]


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path):
    from simclr_keras.models.simclr import build_simclr

    def tiny_model():
        model = build_simclr(width_multiplier=0.125, proj_dim=8, seed=1)
        model.compile(optimizer="sgd")
        return model

    model = tiny_model()
    manager, start = runs.make_checkpoint_manager(model, str(tmp_path))
    assert start == 0
    for step in (1, 2):
        model.optimizer.iterations.assign(step)
        manager.save(checkpoint_number=step)
    # A kill during a later save leaves its files without an index entry: ignored.
    (tmp_path / "checkpoints" / "ckpt-3.index").write_bytes(b"partial")
    assert latest_step(str(tmp_path)) == 2
    # Damage the latest checkpoint's data: the one before is restored instead.
    data_file = next((tmp_path / "checkpoints").glob("ckpt-2.data-*"))
    data_file.write_bytes(data_file.read_bytes()[:100])
    _, restored_step = runs.make_checkpoint_manager(tiny_model(), str(tmp_path))
    assert restored_step == 1
    other = build_simclr(width_multiplier=0.25, proj_dim=8)  # another architecture: nothing restores
    other.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="no checkpoint in .* restores"):
        runs.make_checkpoint_manager(other, str(tmp_path))


def test_drop_partial_last_line(tmp_path):
    path = tmp_path / "log.jsonl"
    assert callbacks.drop_partial_last_line(str(path)) == ""  # missing
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert callbacks.drop_partial_last_line(str(path)) == '{"st'
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert callbacks.drop_partial_last_line(str(path)) == ""
    path.write_text('{"st')
    callbacks.drop_partial_last_line(str(path))
    assert path.read_text() == ""


def test_library_arguments_raise_value_errors_naming_them(bad_folder):
    from simclr_keras import SimCLRAugmentation, WarmupCosineDecay, resnet

    root, _ = bad_folder
    images, info = data.load_images(f"folder:{root}", "test", image_size=8)
    for call, message in [
        (lambda: resnet(depth=18, image_size=4), "image_size must be >= 8 for the cifar stem.*image_size=4"),
        (lambda: resnet(depth=18, image_size=16, stem="imagenet"), "image_size must be >= 32 for the imagenet stem"),
        (lambda: WarmupCosineDecay(float("nan"), 10), "base_learning_rate=nan"),
        (lambda: SimCLRAugmentation(0), "image_size must be positive, got 0"),
        (lambda: data.load_images(f"folder:{root}", "test", image_size=0), "image_size=0"),
        (lambda: data.training_batches(images, info, batch_size=0, image_size=8), "batch_size=0"),
        (lambda: data.training_batches(images, info, batch_size=2, image_size=8, start_step=-1), "start_step=-1"),
        (lambda: data.evaluation_batches(images, info, batch_size=0, image_size=8), "batch_size=0"),
        (lambda: data.check_dataset("mnist", ["train"]), "unknown dataset 'mnist'"),
    ]:
        with pytest.raises(ValueError, match=message):
            call()


TRAIN_BAD_FLAGS = [
    ("--temperature=-0.1", "error: --temperature must be > 0, got -0.1."),
    ("--image_size=4", "error: --image_size must be >= 8, got 4: the ResNet downsamples by 8"),
    ("--learning_rate=0", "error: --learning_rate must be > 0, got 0.0."),
    ("--momentum=1", "error: --momentum must be in [0, 1), got 1.0."),
    ("--checkpoint_every_n_steps=-5", "error: --checkpoint_every_n_steps must be >= 0, got -5."),
    ("--dataset=mnist", "error: unknown dataset 'mnist'"),
    ("--model_dir=/proc/simclr_run", "error: --model_dir=/proc/simclr_run cannot be created or written"),
    ("--strategy=mirrored --cpu_replicas=2 --batch_size=15", "error: --batch_size=15 is not divisible by the 2"),
    ("--optimizer=adagrad", "--optimizer"),  # absl's own enum message
]


@pytest.mark.parametrize("flags, message", TRAIN_BAD_FLAGS, ids=[flags for flags, _ in TRAIN_BAD_FLAGS])
def test_bad_training_flags_end_in_one_line_without_traceback(cifar_100_images, tmp_path, flags, message):
    result = run_module(
        "simclr_keras.train", f"--dataset=folder:{cifar_100_images}", f"--model_dir={tmp_path}/run", "--train_steps=1",
        *flags.split(),
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    if message.startswith("error:"):
        [line] = error_lines(result.stderr)
        assert line.startswith(message), line
    else:
        assert message in result.stderr


class FloatInputEncoder(tf.Module):
    """A SavedModel whose `images` are float32 in [0, 1]: evaluation's uint8 images would be misread."""

    @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32, name="images")])
    def serve(self, images):
        return {"embeddings": tf.reduce_mean(images, axis=[1, 2])}


def test_evaluation_refuses_encoders_it_cannot_feed(cifar_100_images, tmp_path):
    float_export = str(tmp_path / "float_export" / "1")
    module = FloatInputEncoder()
    tf.saved_model.save(module, float_export, signatures={"serving_default": module.serve})
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    (not_a_model / "weights.h5").write_bytes(b"")
    for encoder, message in [
        (float_export, "serving_default takes `images` as float32 (None, 32, 32, 3), but evaluation feeds uint8"),
        (str(not_a_model), "is neither a SavedModel"),
    ]:
        result = run_module(
            "simclr_keras.evaluate", f"--encoder={encoder}", "--protocol=knn", f"--dataset=folder:{cifar_100_images}"
        )
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        [line] = error_lines(result.stderr)
        assert line.startswith(f"error: --encoder={encoder}") and message in line, line


def test_evaluation_checks_the_data_folder_before_loading_the_encoder(tmp_path):
    result = run_module("simclr_keras.evaluate", "--encoder=/no/such/export", f"--dataset=folder:{tmp_path}/none")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [line] = error_lines(result.stderr)
    assert line.startswith(f"error: --dataset=folder:{tmp_path}/none: no train/ folder there"), line


def test_export_refuses_a_file_as_export_dir(tmp_path):
    export_file = tmp_path / "exports"
    export_file.write_text("a file")
    result = run_module("simclr_keras.export", f"--model_dir={tmp_path}", f"--export_dir={export_file}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [line] = error_lines(result.stderr)
    assert line == f"error: --export_dir={export_file} is a file; pass a directory (versions are written into it)."
