"""`python -m simclr_keras.train` end to end on 500 real CIFAR-10 images: outputs, resuming, errors."""

import glob
import json
import math
import os
import subprocess
import sys

import pytest

TINY_RUN = [
    "--batch_size=64",
    "--width_multiplier=0.25",
    "--temperature=0.5",
    "--checkpoint_every_n_steps=2",
    "--eval_batch_size=100",
]


def train(*flags):
    return subprocess.run(
        [sys.executable, "-m", "simclr_keras.train", *flags], capture_output=True, text=True, timeout=300
    )


def read_log(model_dir):
    with open(os.path.join(model_dir, "train_log.jsonl"), encoding="utf-8") as file:
        return [json.loads(line) for line in file]


@pytest.fixture(scope="module")
def three_step_run(cifar10_500, tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("run"))
    result = train(
        f"--dataset=folder:{cifar10_500}", f"--model_dir={model_dir}", "--train_steps=3", "--profile_steps=2,2",
        *TINY_RUN,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return cifar10_500, model_dir, result


def test_profile_steps_records_the_training_step_ops(three_step_run):
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    _, model_dir, _ = three_step_run
    traces = glob.glob(os.path.join(model_dir, "tensorboard", "plugins", "profile", "*", "*.xplane.pb"))
    assert len(traces) == 1, traces
    space = xplane_pb2.XSpace()
    with open(traces[0], "rb") as file:
        space.ParseFromString(file.read())
    op_names = {
        metadata.name for plane in space.planes for metadata in plane.event_metadata.values() if ":" in metadata.name
    }
    # One training step: the encoder's convolutions, forward and their kernel gradients.
    assert any("encoder" in name and "Conv2D" in name for name in op_names)
    assert any("Conv2DBackpropFilter" in name or "gradient_tape" in name for name in op_names)


def test_writes_a_step_log_checkpoints_flags_and_the_probe_result(three_step_run):
    _, model_dir, result = three_step_run
    log = read_log(model_dir)
    assert [record["step"] for record in log] == [1, 2, 3]
    for record in log:
        assert {"loss", "contrastive_accuracy", "learning_rate", "time", "probe_accuracy"} <= set(record)
        # 2N - 1 = 127 candidates per anchor: an untrained encoder scores them nearly alike.
        assert abs(record["loss"] - math.log(127)) < 0.3, record
    assert log[0]["time"] <= log[1]["time"] <= log[2]["time"]
    # Warm-up over the whole 3-step run, from 0 to 1.0 * 64 / 256.
    assert [round(r["learning_rate"], 6) for r in log] == [0.0, round(0.25 / 3, 6), round(0.5 / 3, 6)]

    checkpoints = sorted(os.listdir(os.path.join(model_dir, "checkpoints")))
    assert "ckpt-2.index" in checkpoints and "ckpt-3.index" in checkpoints
    assert os.listdir(os.path.join(model_dir, "tensorboard"))
    with open(os.path.join(model_dir, "eval_results.json"), encoding="utf-8") as file:
        results = json.load(file)
    assert results["num_examples"] == 100 and results["step"] == 3
    assert 0.0 <= results["probe_accuracy"] <= 1.0
    assert f"top-1 accuracy {results['probe_accuracy']:.4f}" in result.stdout


def test_the_run_reloads_with_the_probe_accuracy_it_reported(three_step_run):
    from simclr_keras import data, runs

    data_dir, model_dir, _ = three_step_run
    model = runs.load_model(model_dir)
    test_images, test_info = data.load_images(f"folder:{data_dir}", "test", image_size=32)
    results = model.evaluate(data.evaluation_batches(test_images, test_info, 100, 32), return_dict=True, verbose=0)
    with open(os.path.join(model_dir, "eval_results.json"), encoding="utf-8") as file:
        reported = json.load(file)
    assert results["probe_accuracy"] == pytest.approx(reported["probe_accuracy"], abs=1e-6)
    assert results["probe_loss"] == pytest.approx(reported["probe_loss"], rel=1e-5)
    with pytest.raises(FileNotFoundError, match="model_config.json is missing"):
        runs.load_model(data_dir)


def test_writes_the_training_curves_and_augmented_pairs_pictures(three_step_run):
    from conftest import read_png

    _, model_dir, result = three_step_run
    curves = read_png(os.path.join(model_dir, "training_curves.png"))
    pairs = read_png(os.path.join(model_dir, "augmented_pairs.png"))
    assert curves.shape[0] >= 500 and curves.shape[1] >= 800, curves.shape  # four panels
    # 8 training images, each above its two views: a wide grid of three rows.
    assert pairs.shape[1] > 2 * pairs.shape[0] > 600, pairs.shape
    assert "plots: augmented_pairs.png, training_curves.png" in result.stdout
    assert "the plots were not written" not in result.stderr


def test_rerunning_resumes_and_flags_txt_is_a_flagfile(three_step_run):
    data_dir, model_dir, _ = three_step_run
    flags_file = os.path.join(model_dir, "flags.txt")
    with open(flags_file, encoding="utf-8") as file:
        saved = file.read()
    assert f"--dataset=folder:{data_dir}" in saved and "--width_multiplier=0.25" in saved

    result = train(f"--flagfile={flags_file}", "--train_steps=5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming at step 3" in result.stdout
    assert [record["step"] for record in read_log(model_dir)] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--temperature=0", "error: --temperature must be > 0, got 0.0."),
        ("--batch_size=1", "error: --batch_size must be >= 2"),
        ("--dataset=folder:/no/such/folder", "error: --dataset=folder:/no/such/folder: no train/ folder"),
        ("--batch_size=1024", "error: --batch_size=1024 exceeds the 500 training images"),
        ("--backbone=resnet9", "--backbone"),
        ("--profile_steps=5", "error: --profile_steps takes FIRST,LAST global steps"),
        ("--profile_steps=4,2", "error: --profile_steps takes FIRST,LAST global steps"),
    ],
)
def test_bad_flags_end_in_one_line_without_traceback(cifar10_500, tmp_path, flag, message):
    result = train(f"--dataset=folder:{cifar10_500}", f"--model_dir={tmp_path}", "--train_steps=1", flag)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("config", sorted(os.listdir(os.path.join(os.path.dirname(__file__), "..", "configs"))))
def test_every_config_parses_as_a_flagfile(config):
    from absl import flags

    import simclr_keras.train  # noqa: F401  (defines the flags)

    path = os.path.join(os.path.dirname(__file__), "..", "configs", config)
    parsed = flags.FLAGS(["train", f"--flagfile={path}", "--model_dir=unused"], known_only=False)
    try:
        assert parsed == ["train"]
        assert flags.FLAGS.batch_size >= 2 and flags.FLAGS.temperature > 0
    finally:
        flags.FLAGS.unparse_flags()
