"""Keras callbacks that write a training run's outputs: per-step JSON log, checkpoints, stopping."""

import json
import math
import os
import signal
import time

import keras
import numpy as np
import tensorflow as tf

from simclr_keras.write_failure import reporting_write_failure


def _global_step(model):
    return int(model.optimizer.iterations.numpy())


def drop_partial_last_line(path):
    """Cuts a text file after its last newline, dropping a last line that a kill left unfinished.

    Returns the dropped fragment ("" when the file ends with a newline, is empty or is missing).
    """
    if not os.path.isfile(path):
        return ""
    with open(path, "rb+") as file:
        content = file.read()
        end = content.rfind(b"\n") + 1  # 0 when there is no newline at all
        if end == len(content):
            return ""
        file.truncate(end)
    return content[end:].decode("utf-8", errors="replace")


def drop_records_after(path, step):
    """Cuts the records at the end of a JSONL log whose "step" is above `step`; returns how many went.

    A run resumed from the checkpoint of `step` redoes the steps after it: their earlier records are
    dropped so that every step is logged once, by the run that went on. The cut is after the last
    record of a step <= `step`, so that in logs written before (where redone steps were appended
    again) the later record of a step stays the later one. One truncate call: a kill leaves either
    the old file or the cut one.
    """
    if not os.path.isfile(path):
        return 0
    with open(path, "rb+") as file:
        offset, cut_at, lines_after_cut = 0, 0, 0
        for line in file:
            offset += len(line)
            lines_after_cut += 1
            if line.strip() and json.loads(line)["step"] <= step:
                cut_at, lines_after_cut = offset, 0
        if cut_at < offset:
            file.truncate(cut_at)
    return lines_after_cut


class StepLogger(keras.callbacks.Callback):
    """Appends one JSON object per optimizer step to `path`, and the same scalars to TensorBoard.

    Each line holds `step` (global and 1-based, continuing across resumed runs), `time` (Unix time
    when the step ended) and the step's logs (`loss`, `contrastive_accuracy`, `learning_rate`, and the
    probe's values when there is one). Each line goes to the file in one unbuffered write; should a
    kill cut the last line short, the next run drops that fragment before appending, so the file
    stays valid JSONL. Given `resume_step` (the step of the checkpoint a run resumes from), the
    records after it, which the run redoes, are dropped first: every step is logged once, and the
    record kept is the later one (readers such as `simclr_keras.plots.read_train_log` also let the
    later record win, for older logs). Non-finite values are written as null, since JSON has no NaN.
    TensorBoard scalars use the same global step (Keras' own TensorBoard callback restarts its step
    count when a run resumes). A line that cannot be written raises `WriteFailure`.
    """

    def __init__(self, path, tensorboard_dir=None, resume_step=None):
        super().__init__()
        self.path = path
        self.tensorboard_dir = tensorboard_dir
        self.resume_step = resume_step
        self._file = None
        self._writer = None

    def on_train_begin(self, logs=None):
        with reporting_write_failure("the training log", self.path):
            drop_partial_last_line(self.path)
            if self.resume_step is not None:
                drop_records_after(self.path, self.resume_step)
            # Unbuffered: nothing waits in a Python buffer, to be lost by a kill or to fail at exit.
            self._file = open(self.path, "ab", buffering=0)
        if self.tensorboard_dir:
            with reporting_write_failure("the TensorBoard log", self.tensorboard_dir):
                self._writer = tf.summary.create_file_writer(self.tensorboard_dir)

    def on_train_batch_end(self, batch, logs=None):
        step = _global_step(self.model)
        # np.mean: multi-worker logs arrive with shape [1] (see SimCLR._reducible).
        values = {name: float(np.mean(value)) for name, value in (logs or {}).items()}
        record = {name: (value if math.isfinite(value) else None) for name, value in values.items()}
        line = (json.dumps({"step": step, "time": time.time(), **record}) + "\n").encode("utf-8")
        with reporting_write_failure(f"the training log line of step {step}", self.path):
            written = 0
            while written < len(line):  # a raw write may take part of the line (a nearly full disk)
                written += self._file.write(line[written:])
        if self._writer is not None:
            with reporting_write_failure("the TensorBoard log", self.tensorboard_dir):
                with self._writer.as_default(step=step):
                    for name, value in values.items():
                        tf.summary.scalar(name, value)

    def on_train_end(self, logs=None):
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            writer, self._writer = self._writer, None
            with reporting_write_failure("the TensorBoard log", self.tensorboard_dir):
                writer.close()  # flushes the last events


def _all_finite(variables):
    """Whether every floating-point variable holds only finite values."""
    checks = [tf.reduce_all(tf.math.is_finite(v)) for v in variables if tf.as_dtype(v.dtype).is_floating]
    return bool(tf.reduce_all(checks)) if checks else True


class StopOnNonFinite(keras.callbacks.Callback):
    """Stops `fit` at the first step whose loss is NaN or infinite, and records that step.

    Every logged value whose name ends in "loss" is checked after each step. Given to
    `CheckpointEveryNSteps` (as `non_finite`, and placed before it in the callback list), it keeps
    that callback from saving anything afterwards, so the latest checkpoint stays the last good one.

    Attributes:
      step: the global step of the first non-finite value; None while everything is finite.
      reason: what was non-finite, e.g. "loss" or "weights".
    """

    def __init__(self):
        super().__init__()
        self.step = None
        self.reason = None

    def record(self, step, reason):
        if self.step is None:
            self.step, self.reason = step, reason
        self.model.stop_training = True

    def on_train_batch_end(self, batch, logs=None):
        non_finite = sorted(
            name
            for name, value in (logs or {}).items()
            if name.endswith("loss") and not np.all(np.isfinite(np.asarray(value, np.float64)))
        )
        if non_finite:
            self.record(_global_step(self.model), ", ".join(non_finite))


class CheckpointEveryNSteps(keras.callbacks.Callback):
    """Saves `checkpoint_manager` every `every_n_steps` global steps and when training ends.

    The manager's checkpoint holds the model and optimizer (so the step count, momentum and the
    augmenter's random state resume too). TensorFlow writes the checkpoint files, then replaces the
    `checkpoint` index atomically, then deletes checkpoints beyond max_to_keep, so a kill at any
    moment leaves a complete checkpoint as the latest.

    Nothing is saved once `non_finite` (a `StopOnNonFinite`) has fired, nor when any weight or
    optimizer variable is non-finite (which then stops training, recorded in `non_finite` as
    "weights"): NaN weights never replace the last good checkpoint. A step is saved only once, even
    if it is seen again (a mixed_float16 step skipped by loss scaling does not advance the count).

    A checkpoint that cannot be written (a full disk, no permission) raises `WriteFailure`; what it
    had written is removed again (never in the index, it would only hold the space), and the latest
    checkpoint stays the last complete one.
    """

    def __init__(self, checkpoint_manager, every_n_steps, non_finite=None):
        super().__init__()
        self.checkpoint_manager = checkpoint_manager
        self.every_n_steps = every_n_steps
        self.non_finite = non_finite
        self._saved_step = None

    def _save(self, step):
        if self.non_finite is not None and self.non_finite.step is not None:
            return
        latest = self.checkpoint_manager.latest_checkpoint
        if step == self._saved_step or (latest is not None and latest.endswith(f"-{step}")):
            return
        if not _all_finite(self.model.weights + self.model.optimizer.variables):
            if self.non_finite is not None:
                self.non_finite.record(step, "weights")
            self.model.stop_training = True
            return
        directory = self.checkpoint_manager.directory
        try:
            with reporting_write_failure(f"the checkpoint of step {step}", directory):
                self.checkpoint_manager.save(checkpoint_number=step)
        except Exception:
            remove_unrecorded_checkpoint(directory, step)
            raise
        self._saved_step = step

    def on_train_batch_end(self, batch, logs=None):
        step = _global_step(self.model)
        if self.every_n_steps > 0 and step % self.every_n_steps == 0:
            self._save(step)

    def on_train_end(self, logs=None):
        self._save(_global_step(self.model))


def remove_unrecorded_checkpoint(directory, step):
    """Deletes the files of checkpoint ckpt-STEP in `directory` unless its `checkpoint` index lists it.

    They are what a failed or killed save left: ckpt-STEP_temp/ (the shards being written) and
    ckpt-STEP.index / .data-* (merged, not yet recorded). A recorded checkpoint is never touched.
    """
    state = tf.train.get_checkpoint_state(directory)
    recorded = set(state.all_model_checkpoint_paths) | {state.model_checkpoint_path} if state else set()
    prefix = os.path.join(directory, f"ckpt-{step}")
    if any(os.path.basename(path) == f"ckpt-{step}" for path in recorded):
        return
    for path in tf.io.gfile.glob(f"{prefix}.*") + tf.io.gfile.glob(f"{prefix}_temp"):
        try:
            if tf.io.gfile.isdir(path):
                tf.io.gfile.rmtree(path)
            else:
                tf.io.gfile.remove(path)
        except tf.errors.OpError:  # removing is a courtesy; the index never points at these files
            pass


class StopOnSignal(keras.callbacks.Callback):
    """Turns SIGINT and SIGTERM during `fit` into a stop after the current step.

    `fit` then ends as usual, so `CheckpointEveryNSteps.on_train_end` saves the last completed step.
    The first signal also puts back the handlers that were there before, so a second one acts at
    once (Ctrl-C twice: KeyboardInterrupt; SIGTERM twice: the process ends). Python handles signals
    in the main thread only; run from another thread, this callback does nothing.

    Attributes:
      received: the signal number of the first signal, None if none came.
      step: the global step training stopped at after it.
    """

    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM)):
        super().__init__()
        self.signals = tuple(signals)
        self.received = None
        self.step = None
        self._previous_handlers = {}

    @property
    def signal_name(self):
        return signal.Signals(self.received).name if self.received is not None else None

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signum
        self._restore_handlers()

    def _restore_handlers(self):
        for signum, handler in self._previous_handlers.items():
            # None: the handler was not installed from Python; the default is the closest.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous_handlers = {}

    def on_train_begin(self, logs=None):
        try:
            self._previous_handlers = {signum: signal.signal(signum, self._handle) for signum in self.signals}
        except ValueError:  # not the main thread
            self._previous_handlers = {}

    def on_train_batch_end(self, batch, logs=None):
        if self.received is not None:
            self.step = _global_step(self.model)
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.received is not None and self.step is None:
            self.step = _global_step(self.model)  # it came after the last step
        self._restore_handlers()


class StopAtStep(keras.callbacks.Callback):
    """Stops `fit` once the optimizer has taken `total_steps` steps (resumed runs end mid-epoch)."""

    def __init__(self, total_steps):
        super().__init__()
        self.total_steps = total_steps

    def on_train_batch_end(self, batch, logs=None):
        if _global_step(self.model) >= self.total_steps:
            self.model.stop_training = True


class ProfileSteps(keras.callbacks.Callback):
    """Records a TensorFlow profile of global steps first..last (1-based, inclusive) into `logdir`.

    The trace lands in logdir/plugins/profile/<time>/ and opens in TensorBoard's Profile tab (the
    tensorboard-plugin-profile package) or with benchmarks/step_profile.py. Steps are counted like the
    log's, so a resumed run profiles the same global steps; a range already passed records nothing.
    """

    def __init__(self, logdir, first, last):
        super().__init__()
        self.logdir, self.first, self.last = logdir, first, last
        self.active = False

    def on_train_batch_begin(self, batch, logs=None):
        if not self.active and _global_step(self.model) + 1 == self.first:
            tf.profiler.experimental.start(self.logdir)
            self.active = True

    def on_train_batch_end(self, batch, logs=None):
        if self.active and _global_step(self.model) >= self.last:
            self._stop()

    def on_train_end(self, logs=None):
        self._stop()  # a run that ends (or is stopped) inside the range still writes its trace

    def _stop(self):
        if self.active:
            tf.profiler.experimental.stop()
            self.active = False
