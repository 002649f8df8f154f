"""Issue 19: one training process per run directory; killed anywhere or out of disk space, nothing is lost.

The lock tests run the lock module in a child Python without TensorFlow (seconds). Write failures are
real operating-system failures: a file-size limit (RLIMIT_FSIZE, writes beyond it fail with EFBIG,
no root needed) in-process, and a small tmpfs for the command-line tests (skipped without root).
"""

import contextlib
import errno
import hashlib
import importlib.util
import json
import os
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO_ROOT, make_cifar10_subset

import kill_harness
from simclr_keras import callbacks, runs
from simclr_keras.run_lock import RunLock, RunLockedError, read_holder
from simclr_keras.write_failure import WriteFailure, error_reason, stop_message

TINY = ["--batch_size=16", "--width_multiplier=0.125", "--optimizer=sgd", "--learning_rate=0.5", "--eval_split="]
# The child loads run_lock.py by path: importing the package would load TensorFlow (seconds).
HOLD_LOCK = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("run_lock", sys.argv[1])
run_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_lock)
lock = run_lock.RunLock(sys.argv[2]).acquire()  # kept referenced: a collected lock is released
print("locked", flush=True)
time.sleep(600)
"""
RUN_LOCK_PATH = os.path.join(REPO_ROOT, "simclr_keras", "run_lock.py")


def _hold_lock_in_child(model_dir):
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, RUN_LOCK_PATH, str(model_dir)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline() == "locked\n"
    return child


def test_the_lock_names_its_holder_and_a_kill_9_releases_it(tmp_path):
    child = _hold_lock_in_child(tmp_path)
    try:
        with pytest.raises(RunLockedError) as raised:
            RunLock(str(tmp_path)).acquire()
        assert raised.value.holder["pid"] == child.pid
        assert str(raised.value) == (
            f"{tmp_path} is already being trained by process {child.pid} on {socket.gethostname()} "
            f"(it holds {tmp_path}/train.lock)"
        )
    finally:
        child.kill()  # SIGKILL: the child runs no code; the kernel drops its lock
        child.wait()
    lock = RunLock(str(tmp_path)).acquire()
    assert read_holder(lock.path)["pid"] == os.getpid()
    with pytest.raises(RunLockedError):  # a second lock in the same process is refused too
        RunLock(str(tmp_path)).acquire()
    lock.release()
    RunLock(str(tmp_path)).acquire().release()


def test_a_dead_previous_holder_in_the_file_is_not_named(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "train.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    assert read_holder(str(tmp_path / "train.lock"), wait_seconds=0.1) == {}
    assert "by another process" in str(RunLockedError(str(tmp_path), {}))


def _train_command(data_dir, model_dir, *flags):
    return [sys.executable, "-m", "simclr_keras.train", f"--dataset=folder:{data_dir}", f"--model_dir={model_dir}", *TINY, *flags]


@pytest.fixture(scope="module")
def images_100(tmp_path_factory):
    return make_cifar10_subset(tmp_path_factory.mktemp("cifar10_100"), 10, 2)


def _log_steps(model_dir):
    with open(os.path.join(model_dir, "train_log.jsonl"), encoding="utf-8") as file:
        return [json.loads(line)["step"] for line in file]


def _latest_step(model_dir):
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    return int(latest.rsplit("-", 1)[-1]) if latest else None


@pytest.mark.slow
def test_a_second_run_on_the_same_model_dir_exits_and_evaluation_reads_it_meanwhile(images_100, tmp_path):
    model_dir = str(tmp_path / "run")
    first = subprocess.Popen(
        _train_command(images_100, model_dir, "--train_steps=5000", "--checkpoint_every_n_steps=2", "--seed=1"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 240
        while _latest_step(model_dir) is None:
            assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.1)
        started = time.time()
        second = subprocess.run(
            _train_command(images_100, model_dir, "--train_steps=24", "--seed=2"), capture_output=True, text=True
        )
        seconds = time.time() - started
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert errors == [
            f"error: --model_dir={model_dir} is already being trained by process {first.pid} on {socket.gethostname()} "
            f"(it holds {model_dir}/train.lock); wait for it to end (or stop it), or pass another --model_dir."
        ]
        print(f"the second process exited after {seconds:.1f} s")
        # Evaluation reads the run being trained, without the lock and without disturbing it.
        evaluation = subprocess.run(
            [sys.executable, "-m", "simclr_keras.evaluate", f"--model_dir={model_dir}", "--protocol=knn",
             f"--dataset=folder:{images_100}", "--knn_k=5"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert evaluation.returncode == 0, evaluation.stderr[-3000:]
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    steps = _log_steps(model_dir)
    assert steps == list(range(1, len(steps) + 1))  # one run's records, each step once
    assert "--seed=1" in (tmp_path / "run" / "flags.txt").read_text()
    RunLock(model_dir).acquire().release()  # the first run's end released it


@contextlib.contextmanager
def file_size_limit(limit_bytes):
    """Writes beyond limit_bytes fail with EFBIG (RLIMIT_FSIZE), as on a disk that is full."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the signal ends the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)


def _tiny_model():
    from simclr_keras.models.simclr import build_simclr

    model = build_simclr(width_multiplier=0.125, proj_dim=8, seed=1)  # a 1.5 MB checkpoint
    model.compile(optimizer=keras.optimizers.SGD(momentum=0.9))
    return model


def _hashes(directory):
    return {
        name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
        for name in sorted(os.listdir(directory))
        if (directory / name).is_file()
    }


def test_a_checkpoint_that_cannot_be_written_keeps_the_last_complete_one(tmp_path):
    model = _tiny_model()
    manager, _ = runs.make_checkpoint_manager(model, str(tmp_path))
    saver = callbacks.CheckpointEveryNSteps(manager, every_n_steps=4)
    saver.set_model(model)
    model.optimizer.iterations.assign(4)
    saver.on_train_batch_end(0)
    before = _hashes(tmp_path / "checkpoints")
    model.optimizer.iterations.assign(8)
    with file_size_limit(16 * 1024), pytest.raises(WriteFailure) as raised:
        saver.on_train_batch_end(0)
    assert str(raised.value) == f"could not write the checkpoint of step 8 to {tmp_path}/checkpoints (File too large)"
    # TensorFlow's own reading of the index: still step 4, whose files are untouched; nothing of step 8 is left.
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith("ckpt-4")
    assert _hashes(tmp_path / "checkpoints") == before
    assert not [name for name in os.listdir(tmp_path / "checkpoints") if name.startswith("ckpt-8")]
    message = stop_message(raised.value, str(tmp_path / "checkpoints"))
    assert message.endswith(
        f"the last complete checkpoint (step 4, {tmp_path}/checkpoints/ckpt-4) is kept. Free space (or fix the "
        "permissions) and rerun the same command to resume from it."
    )
    assert runs.make_checkpoint_manager(_tiny_model(), str(tmp_path))[1] == 4


def test_a_log_line_that_cannot_be_written_stops_and_leaves_valid_jsonl(tmp_path):
    path = tmp_path / "train_log.jsonl"
    path.write_text("".join(json.dumps({"step": step, "loss": 1.0}) + "\n" for step in range(1, 41)))
    model = _tiny_model()
    logger = callbacks.StepLogger(str(path), resume_step=30)
    logger.set_model(model)
    logger.on_train_begin()
    model.optimizer.iterations.assign(31)
    size = path.stat().st_size  # steps 1-30: the records after the resumed checkpoint are gone
    with file_size_limit(size + 20), pytest.raises(WriteFailure) as raised:
        logger.on_train_batch_end(0, {"loss": 0.5, "contrastive_accuracy": 0.25})
    assert str(raised.value) == f"could not write the training log line of step 31 to {path} (File too large)"
    assert path.stat().st_size == size + 20  # the disk took 20 bytes of the line: it is cut short
    callbacks.drop_partial_last_line(str(path))  # what the next run does first
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == list(range(1, 31))


def test_drop_records_after_keeps_each_step_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "log.jsonl"
    assert callbacks.drop_records_after(str(path), 3) == 0  # missing
    path.write_text("".join(f'{{"step": {step}}}\n' for step in (1, 2, 3, 4, 5, 6)))
    assert callbacks.drop_records_after(str(path), 4) == 2
    assert path.read_text() == "".join(f'{{"step": {step}}}\n' for step in (1, 2, 3, 4))
    # A log written before records were dropped: steps 3-5 twice (a resume from step 2). Only the tail
    # after the last record of step <= 4 goes, so the redone records of 3 and 4 stay the later ones.
    path.write_text("".join(f'{{"step": {step}}}\n' for step in (1, 2, 3, 4, 5, 3, 4, 5, 6)))
    assert callbacks.drop_records_after(str(path), 4) == 2
    assert path.read_text() == "".join(f'{{"step": {step}}}\n' for step in (1, 2, 3, 4, 5, 3, 4))
    assert callbacks.drop_records_after(str(path), 0) == 7 and path.read_text() == ""


def test_error_reason_reads_tensorflows_message():
    # The message SaveV2 gives on a full tmpfs (TensorFlow 2.21).
    error = tf.errors.ResourceExhaustedError(
        None, None,
        "{{function_node __wrapped__SaveV2_dtypes_3_device_/job:localhost/replica:0/task:0/device:CPU:0}} "
        "/d/checkpoints/ckpt-1_temp/part-00000-of-00001.data-00000-of-00001.tempstate1; No space left on device "
        "[Op:SaveV2]",
    )  # fmt: skip
    assert error_reason(error) == "No space left on device"
    assert error_reason(OSError(errno.EACCES, "Permission denied")) == "Permission denied"


def test_plots_stop_the_run_only_when_the_disk_refuses_them(monkeypatch, tmp_path, capsys):
    from simclr_keras import plots, train_run

    class NoAugmenter:
        augmenter = None

    images = tf.data.Dataset.from_tensor_slices((np.zeros([8, 8, 8, 3], np.uint8), np.zeros([8], np.int64)))
    def raising(error):
        return lambda *args: (_ for _ in ()).throw(error)

    monkeypatch.setattr(plots, "write_run_plots", raising(OSError(errno.ENOSPC, "No space left on device")))
    expected = f"could not write the plots to {tmp_path} (No space left on device)"
    with pytest.raises(WriteFailure, match=re.escape(expected)):
        train_run._write_plots(NoAugmenter(), images, ["a"], str(tmp_path), 0)
    monkeypatch.setattr(plots, "write_run_plots", raising(ValueError("no font")))
    train_run._write_plots(NoAugmenter(), images, ["a"], str(tmp_path), 0)  # a drawing problem only warns
    assert "warning: the plots were not written (ValueError: no font)" in capsys.readouterr().err


@pytest.fixture
def small_tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs directory of that size (a disk that fills up); skips without root."""
    mounted = []

    def mount(size):
        path = tmp_path / f"tmpfs_{len(mounted)}"
        path.mkdir()
        command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=False)


def _fill(directory, leave_bytes):
    """Fills the filesystem of `directory` but for about leave_bytes; returns the filler file."""
    filler = directory / "filler"
    with open(filler, "wb") as file:
        with contextlib.suppress(OSError):
            while True:
                file.write(b"\0" * 65536)
                file.flush()
    os.truncate(filler, max(0, filler.stat().st_size - leave_bytes))
    return filler


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_write_stops_in_one_line_and_the_rerun_resumes(images_100, small_tmpfs):
    model_dir = small_tmpfs("32m") / "run"
    first = subprocess.run(
        _train_command(images_100, model_dir, "--train_steps=8", "--checkpoint_every_n_steps=4"), capture_output=True, text=True
    )
    assert first.returncode == 0, first.stderr[-3000:]
    before = _hashes(model_dir / "checkpoints")
    # 256 KB left: the log lines and TensorBoard events of steps 9-12 fit, a 1.5 MB checkpoint does not.
    filler = _fill(model_dir.parent, leave_bytes=256 * 1024)
    command = _train_command(images_100, model_dir, "--train_steps=16", "--checkpoint_every_n_steps=4")
    full = subprocess.run(command, capture_output=True, text=True)
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert _error_lines(full.stderr) == [
        f"error: could not write the checkpoint of step 12 to {model_dir}/checkpoints (No space left on device); "
        f"the last complete checkpoint (step 8, {model_dir}/checkpoints/ckpt-8) is kept. Free space (or fix the "
        "permissions) and rerun the same command to resume from it."
    ]
    print(_error_lines(full.stderr)[0])
    after = _hashes(model_dir / "checkpoints")
    assert all(after[name] == digest for name, digest in before.items() if name != "checkpoint")  # step 8 untouched
    assert _latest_step(str(model_dir)) == 8 and not [name for name in after if name.startswith("ckpt-12")]

    filler.unlink()  # space freed
    rerun = subprocess.run(command, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming at step 8" in rerun.stdout
    assert _latest_step(str(model_dir)) == 16 and _log_steps(str(model_dir)) == list(range(1, 17))


@pytest.mark.slow
def test_a_full_export_dir_stops_in_one_line_and_keeps_the_final_checkpoint(images_100, small_tmpfs, tmp_path):
    export_dir = small_tmpfs("256k")
    model_dir = tmp_path / "run"
    result = subprocess.run(
        _train_command(images_100, model_dir, "--train_steps=4", f"--export_dir={export_dir}"), capture_output=True, text=True
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    [line] = _error_lines(result.stderr)
    assert line.startswith(f"error: could not write the export to {export_dir} (No space left on device); ")
    assert line.endswith(
        f"the last complete checkpoint (step 4, {model_dir}/checkpoints/ckpt-4) is kept. Free space (or fix the "
        "permissions) and rerun the same command to resume from it."
    )
    assert os.listdir(export_dir) == []  # no version folder, no staging folder left holding the space
    assert _latest_step(str(model_dir)) == 4


@pytest.mark.slow
def test_killed_anywhere_the_run_ends_bit_equal_to_an_uninterrupted_one(tmp_path):
    """A small kill_harness run: one SIGKILL at each kind of moment (the long run: tests/kill_harness.py)."""
    data_dir = make_cifar10_subset(tmp_path / "data", 10, 2)
    targets = ["start", "log", "checkpoint.merge", "checkpoint.index", "checkpoint.sweep", "evaluation", "export"]
    kills, found = kill_harness.run_harness(str(tmp_path), data_dir, 16, targets, random.Random(0), pause=0.6)
    assert found == []
    assert len(kills) == len(targets)
    phases = {target: phase for target, phase, _ in kills}
    assert all(phases[target] == target for target in targets[1:]), kills  # each kill hit its target
