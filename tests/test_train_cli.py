"""Training: `python -m simclr_keras.train`, `TrainConfig` and `pretrain`, on a few real CIFAR-10 images.

One subprocess run checks the command line end to end (outputs, profile, pictures); the flag errors,
the resumed runs and the faults run `train.main` or `pretrain` in this process (conftest.run_train_main).
"""

import dataclasses
import glob
import hashlib
import json
import math
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
from conftest import BAD_FILES, run_train_main

from simclr_keras import runs
from simclr_keras.train_config import ConfigError, TrainConfig

TINY_RUN = [
    "--batch_size=64",
    "--width_multiplier=0.25",
    "--temperature=0.5",
    "--checkpoint_every_n_steps=2",
    "--eval_batch_size=100",
]
TINY = ["--batch_size=16", "--width_multiplier=0.125", "--optimizer=sgd", "--learning_rate=0.5", "--eval_batch_size=50"]
CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def train(*flags):
    return subprocess.run(
        [sys.executable, "-m", "simclr_keras.train", *flags], capture_output=True, text=True, timeout=300
    )


def read_log(model_dir):
    with open(os.path.join(model_dir, "train_log.jsonl"), encoding="utf-8") as file:
        return [json.loads(line) for line in file]


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def latest_step(model_dir):
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    return int(latest.rsplit("-", 1)[-1]) if latest else None


def checkpointed_iterations(model_dir):
    """The optimizer's step counter as stored in the latest checkpoint file (read by TensorFlow, not by us)."""
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    [name] = [name for name, _ in tf.train.list_variables(latest) if name.startswith("optimizer/") and "iteration" in name]
    return int(tf.train.load_variable(latest, name))


# ----------------------------------------------------------------------------- the command line, end to end


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
    assert f"top-1 accuracy {results['probe_accuracy']:.4f}" in result.stdout


def test_the_run_reloads_with_the_probe_accuracy_it_reported(three_step_run):
    from simclr_keras import data

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


def test_from_run_dir_reads_the_settings_the_command_line_ran_with(three_step_run, tmp_path):
    data_dir, model_dir, _ = three_step_run
    moved = str(tmp_path / "moved")
    shutil.copytree(model_dir, moved)
    # The flags of the fixture, written out by hand; every other field at its default.
    expected = TrainConfig(
        dataset=f"folder:{data_dir}", model_dir=moved, train_steps=3, profile_steps=("2", "2"), batch_size=64,
        width_multiplier=0.25, temperature=0.5, checkpoint_every_n_steps=2, eval_batch_size=100,
    )  # fmt: skip
    assert TrainConfig.from_run_dir(moved) == expected
    with pytest.raises(FileNotFoundError, match="flags.txt is missing"):
        TrainConfig.from_run_dir(data_dir)


def test_rerunning_resumes_and_flags_txt_is_a_flagfile(three_step_run):
    data_dir, model_dir, _ = three_step_run
    flags_file = os.path.join(model_dir, "flags.txt")
    with open(flags_file, encoding="utf-8") as file:
        saved = file.read()
    assert f"--dataset=folder:{data_dir}" in saved and "--width_multiplier=0.25" in saved

    status, stdout, stderr = run_train_main(f"--flagfile={flags_file}", "--train_steps=5")
    assert status == 0, stderr[-3000:]
    assert "resuming at step 3" in stdout
    assert [record["step"] for record in read_log(model_dir)] == [1, 2, 3, 4, 5]
    assert latest_step(model_dir) == checkpointed_iterations(model_dir) == 5


def test_a_flag_error_answers_without_loading_tensorflow(tmp_path):
    # The command line as a user runs it, in a fresh interpreter: TensorFlow must not be imported.
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['train', '--batch_size=0', '--model_dir={tmp_path}']\n"
        "try:\n    runpy.run_module('simclr_keras.train', run_name='__main__')\n"
        "except SystemExit as exit:\n    print('exit', exit.code, 'tensorflow' in sys.modules)\n"
    )
    started = time.time()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "exit 2 False", result.stdout + result.stderr[-2000:]
    assert error_lines(result.stderr) == ["error: --batch_size must be >= 2 (NT-Xent needs negatives), got 0."]
    assert time.time() - started < 5


# ----------------------------------------------------------------------------- TrainConfig and its flags


def test_the_flags_are_the_train_config_fields():
    from absl import flags

    import simclr_keras.train  # noqa: F401  (defines the flags)

    fields = {field.name: field for field in dataclasses.fields(TrainConfig)}
    module_flags = {flag.name: flag for flag in flags.FLAGS.get_key_flags_for_module("simclr_keras.train")}
    # The spelling of earlier versions still parses (old flags.txt files): an alias, not a field.
    assert module_flags.pop("moco_key_bn_splits").help.startswith("Alias for --moco_bn_splits")
    assert set(module_flags) == set(fields)
    for name, flag in module_flags.items():
        default = tuple(flag.default) if isinstance(flag.default, list) else flag.default
        assert default == fields[name].default, name
        assert type(default) is type(fields[name].default), name  # 10.0, not 10
        assert flag.help.endswith(fields[name].metadata["help"]), name  # enums begin "<a|b>: "
    assert list(module_flags["backbone"].parser.enum_values) == ["resnet18", "resnet34", "resnet50"]


def test_flag_lines_and_read_flagfile_round_trip_every_kind_of_field(tmp_path):
    from simclr_keras import config_flags

    config = TrainConfig(
        model_dir="/runs/a", dataset="folder:/data/x y", zero_init_residual=False, global_bn=False, use_blur=True,
        proj_batch_norm="hidden", micro_batch_size=8, warmup_epochs=2.5, weight_decay=1e-6, profile_steps=("3", "4"),
        objective_scale=1.0, train_split="",
    )  # fmt: skip
    lines = config.flag_lines()
    # absl's spellings: booleans as --name/--noname, lists comma-separated, None left out.
    assert "--nozero_init_residual" in lines and "--use_blur" in lines and "--profile_steps=3,4" in lines
    assert not any(line.startswith("--tpu") or line.startswith("--export_dir") for line in lines)
    path = tmp_path / "flags.txt"
    path.write_text("\n".join(lines) + "\n")
    assert config_flags.read_flagfile(TrainConfig, str(path)) == config
    # A flags.txt of an earlier version, with the old spelling of moco_bn_splits.
    path.write_text("--model_dir=/runs/old\n--moco_key_bn_splits=4\n")
    assert config_flags.read_flagfile(TrainConfig, str(path)).moco_bn_splits == 4


@pytest.mark.parametrize("config", sorted(name for name in os.listdir(CONFIGS) if name.endswith(".flags")))
def test_every_config_parses_as_a_flagfile_into_a_valid_train_config(config):
    from simclr_keras import config_flags

    parsed = config_flags.read_flagfile(TrainConfig, os.path.join(CONFIGS, config)).replace(model_dir="unused")
    assert parsed.validate() == []
    assert parsed.batch_size >= 2 and parsed.temperature > 0


@pytest.mark.parametrize("config", sorted(os.listdir(os.path.join(CONFIGS, "evaluation"))))
def test_every_evaluation_config_parses_as_a_flagfile_into_a_valid_eval_config(config):
    # configs/evaluation/ holds the flags of `python -m simclr_keras.evaluate`.
    from simclr_keras import config_flags
    from simclr_keras.eval_config import EvalConfig

    path = os.path.join(CONFIGS, "evaluation", config)
    assert config_flags.read_flagfile(EvalConfig, path).replace(model_dir="unused").validate() == []


INVALID = [
    (dict(temperature=0.0), "temperature must be > 0, got 0.0."),
    (dict(temperature=-0.1), "temperature must be > 0, got -0.1."),
    (dict(batch_size=1), "batch_size must be >= 2 (NT-Xent needs negatives), got 1."),
    (dict(image_size=4), "image_size must be >= 8, got 4: the ResNet downsamples by 8"),
    (dict(learning_rate=0.0), "learning_rate must be > 0, got 0.0."),
    (dict(momentum=1.0), "momentum must be in [0, 1), got 1.0."),
    (dict(checkpoint_every_n_steps=-5), "checkpoint_every_n_steps must be >= 0, got -5."),
    (dict(profile_steps=("5",)), "profile_steps takes FIRST,LAST global steps with 1 <= FIRST <= LAST, e.g. 5,8; got '5'."),
    (dict(profile_steps=("4", "2")), "profile_steps takes FIRST,LAST global steps"),
    (dict(proj_layers=-1), "proj_layers must be an integer >= 0 (0: no projection head, the loss on h), got -1."),
    (dict(flip_probability=1.5), "flip_probability must be in [0, 1], got 1.5."),
    (dict(grayscale_probability=-0.1), "grayscale_probability must be in [0, 1], got -0.1."),
    (dict(color_jitter_probability=2.0), "color_jitter_probability must be in [0, 1], got 2.0."),
    (dict(micro_batch_size=0), "micro_batch_size must be an integer >= 1 (or None: one pass), got 0."),
    (dict(method="moco_v2", micro_batch_size=8), "micro_batch_size=8 applies to method=simclr"),
    (dict(method="moco_v2", loss="hard_negative"), "loss=hard_negative applies to method=simclr"),
    (dict(debias_tau_plus=1.0), "debias_tau_plus must be in [0, 1), got 1.0."),
    (dict(moco_momentum=1.0), "moco_momentum must be in [0, 1), got 1.0."),
    (dict(cpu_replicas=2), "cpu_replicas=2 needs strategy=mirrored or multi_worker, got strategy=default."),
    (dict(cpu_replicas=1), "cpu_replicas must be 0 (off) or >= 2, got 1."),
    (dict(knn_every_n_epochs=1, eval_split=""), "knn_every_n_epochs=1 classifies images of eval_split, which is empty"),
    (dict(train_steps=0, train_epochs=0), "train_steps=0 and train_epochs=0: set either to a positive number."),
    (dict(backbone="resnet9"), "backbone must be one of ['resnet18', 'resnet34', 'resnet50'], got 'resnet9'."),
    (dict(batch_size="64"), "batch_size must be an integer, got '64'."),
    (dict(model_dir=None), "model_dir must be set"),
]


@pytest.mark.parametrize("changes, message", INVALID, ids=[",".join(changes) for changes, _ in INVALID])
def test_validate_names_the_field_the_value_and_what_is_valid(changes, message):
    problems = TrainConfig(**{"model_dir": "/runs/a", **changes}).validate()
    assert len(problems) == 1 and problems[0].startswith(message), problems


def test_validate_reports_every_problem_and_pretrain_refuses_them(tmp_path):
    config = TrainConfig(model_dir=str(tmp_path / "run"), temperature=0.0, batch_size=1, momentum=2.0)
    assert [problem.split()[0] for problem in config.validate()] == ["temperature", "batch_size", "momentum"]
    from simclr_keras.train_run import pretrain

    with pytest.raises(ConfigError, match="temperature must be > 0") as raised:
        pretrain(config)
    assert len(raised.value.problems) == 3 and not os.path.exists(tmp_path / "run")  # refused before any write
    assert TrainConfig(model_dir="/runs/a").validate() == []


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperature=0"], "error: --temperature must be > 0, got 0.0."),
        (["--grayscale_probability=1.2"], "error: --grayscale_probability must be in [0, 1], got 1.2."),
        (["--image_size=4"], "error: --image_size must be >= 8, got 4: the ResNet downsamples by 8"),
        (["--micro_batch_size=8", "--method=moco_v2"], "error: --micro_batch_size=8 applies to --method=simclr;"),
        (["--cpu_replicas=2"], "error: --cpu_replicas=2 needs --strategy=mirrored or multi_worker, got --strategy=default."),
        (["--knn_every_n_epochs=1", "--eval_split="], "error: --knn_every_n_epochs=1 classifies images of --eval_split, which"),
    ],
)
def test_invalid_flags_end_in_one_line_and_status_2(tmp_path, flags, message):
    status, stdout, stderr = run_train_main(f"--model_dir={tmp_path}/run", *flags)
    assert status == 2 and error_lines(stderr) == [stderr.strip()], stderr
    assert stderr.startswith(message) and not os.path.exists(tmp_path / "run"), stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dataset=folder:/no/such/folder"], "error: --dataset=folder:/no/such/folder: no train/ folder"),
        (["--batch_size=1024"], "error: --batch_size=1024 exceeds the 100 training images"),
        (["--dataset=mnist"], "error: unknown dataset 'mnist'"),
        (["--model_dir=/proc/simclr_run"], "error: --model_dir=/proc/simclr_run cannot be created or written"),
        (["--micro_batch_size=24", "--batch_size=64"],
         "error: --micro_batch_size=24 must divide the 64 images each replica trains on per step; pick a divisor "
         "of 64. (--batch_size=64 over 1 replica(s))"),
        (["--method=moco_v2", "--batch_size=32", "--moco_queue_size=16"],
         "error: --moco_queue_size=16 is smaller than the 64 keys of one step."),
        (["--method=moco_v2", "--batch_size=20", "--moco_bn_splits=8"],
         "error: --moco_bn_splits=8 must divide the 20 images of each view that each replica encodes per step"),
    ],  # fmt: skip
)
def test_settings_the_data_or_devices_refuse_end_in_one_line_and_status_1(cifar_100_images, tmp_path, flags, message):
    status, stdout, stderr = run_train_main(
        f"--dataset=folder:{cifar_100_images}", f"--model_dir={tmp_path}/run", "--train_steps=1", "--eval_split=", *flags
    )
    assert status == 1 and "Traceback" not in stderr, stderr[-2000:]
    [line] = error_lines(stderr)
    assert line.startswith(message), line


# ----------------------------------------------------------------------------- pretrain, the library call


def test_pretrain_trains_and_a_second_call_continues_the_global_step(cifar_100_images, tmp_path):
    from simclr_keras.train_run import FINISHED, pretrain

    model_dir = str(tmp_path / "run")
    config = TrainConfig(
        dataset=f"folder:{cifar_100_images}", model_dir=model_dir, train_steps=2, batch_size=16, width_multiplier=0.125,
        optimizer="sgd", learning_rate=0.5, checkpoint_every_n_steps=100, eval_batch_size=20,
    )  # fmt: skip
    first = pretrain(config)
    assert (first.final_step, first.stop_reason, first.model_dir) == (2, FINISHED, model_dir)
    assert latest_step(model_dir) == checkpointed_iterations(model_dir) == 2
    with open(os.path.join(model_dir, "eval_results.json"), encoding="utf-8") as file:
        assert json.load(file) == first.eval_results and first.eval_results["step"] == 2
    first_log = read_log(model_dir)

    second = pretrain(TrainConfig.from_run_dir(model_dir).replace(train_steps=5))
    assert (second.final_step, second.stop_reason) == (5, FINISHED)
    assert latest_step(model_dir) == checkpointed_iterations(model_dir) == 5
    log = read_log(model_dir)
    assert [record["step"] for record in log] == [1, 2, 3, 4, 5] and log[:2] == first_log
    # The second call took only steps 3-5 (a run that restored nothing would redo 1-5, rewriting 1 and 2).
    assert [record["step"] for record in log if record["time"] > first_log[-1]["time"]] == [3, 4, 5]
    # The schedule continues too: step 3's rate is the warm-up's 3rd value over the 5-step run, not its 1st.
    peak = 0.5 * 16 / 256
    assert [round(record["learning_rate"], 7) for record in log[2:]] == [round(peak * k / 5, 7) for k in (2, 3, 4)]
    assert second.eval_results["step"] == 5


# ----------------------------------------------------------------------------- bad data, non-finite losses, crashes


def test_trains_on_the_bad_folder_and_reports_each_skipped_file(bad_folder_run):
    root, model_dir, (status, stdout, stderr) = bad_folder_run
    assert status == 0, stderr[-3000:]
    assert f"warning: folder:{root} split 'train': skipped 5 file(s) that do not decode as images" in stderr
    for name in BAD_FILES:
        assert re.search(rf"^  \S+/train/cat/{re.escape(name)}: ", stderr, re.MULTILINE), name
    assert "31 training images" in stdout
    assert [record["step"] for record in read_log(model_dir)] == [1, 2, 3]
    with open(os.path.join(model_dir, "classes.json"), encoding="utf-8") as file:
        assert json.load(file)["class_names"] == ["airplane", "cat", "empty_class"]


def test_strict_data_turns_a_bad_file_into_a_one_line_error(bad_folder, tmp_path):
    root, _ = bad_folder
    status, _, stderr = run_train_main(
        f"--dataset=folder:{root}", "--strict_data", f"--model_dir={tmp_path}", "--train_steps=1", "--batch_size=8"
    )
    assert status == 1
    [line] = error_lines(stderr)
    match = re.match(rf"error: --dataset=folder:{re.escape(root)}: \S+/train/cat/(\w+\.\w+) does not decode", line)
    assert match and match.group(1) in BAD_FILES, line


def _file_hashes(directory):
    return {
        name: hashlib.sha256((open(os.path.join(directory, name), "rb")).read()).hexdigest()
        for name in sorted(os.listdir(directory))
    }


def test_a_non_finite_loss_stops_training_and_keeps_the_last_checkpoint(bad_folder_run, tmp_path):
    _, trained_dir, _ = bad_folder_run
    model_dir = str(tmp_path / "run")
    shutil.copytree(trained_dir, model_dir)  # the fixture's run stays as it was for other tests
    checkpoint_dir = os.path.join(model_dir, "checkpoints")
    before = _file_hashes(checkpoint_dir)
    assert latest_step(model_dir) == 3
    # A learning rate of 1e30 from the first resumed step: the weights explode within two steps.
    status, _, stderr = run_train_main(
        f"--flagfile={trained_dir}/flags.txt", f"--model_dir={model_dir}", "--train_steps=20", "--learning_rate=1e30",
        "--warmup_epochs=0", "--checkpoint_every_n_steps=1",
    )  # fmt: skip
    assert status == 1, stderr[-3000:]
    [line] = error_lines(stderr)
    match = re.fullmatch(r"error: non-finite (.*) at step (\d+); the last checkpoint \(step (\d+)\) is kept\. (.*)", line)
    assert match, line
    reason, bad_step, kept_step = match.group(1), int(match.group(2)), int(match.group(3))
    assert match.group(4) == "Lower --learning_rate (or use --precision=float32) and rerun to resume from it."
    assert "loss" in reason or reason == "weights"
    assert kept_step < bad_step and latest_step(model_dir) == kept_step
    after = _file_hashes(checkpoint_dir)
    # Earlier checkpoints are untouched, and none was written at or after the bad step.
    assert all(after.get(name) == digest for name, digest in before.items() if name != "checkpoint")
    assert not any(re.match(rf"ckpt-{step}\.", name) for name in after for step in range(bad_step, 21))
    model = runs.load_model(model_dir)
    assert all(np.all(np.isfinite(weight)) for weight in model.get_weights())
    log = read_log(model_dir)  # still valid JSONL: NaN is written as null
    assert log[-1]["step"] <= bad_step


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


@pytest.mark.slow
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


@pytest.mark.slow
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
