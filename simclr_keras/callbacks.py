"""Keras callbacks that write a training run's outputs: per-step JSON log, checkpoints, stopping."""

import json
import time

import keras
import numpy as np
import tensorflow as tf


def _global_step(model):
    return int(model.optimizer.iterations.numpy())


class StepLogger(keras.callbacks.Callback):
    """Appends one JSON object per optimizer step to `path`, and the same scalars to TensorBoard.

    Each line holds `step` (global and 1-based, continuing across resumed runs), `time` (Unix time
    when the step ended) and the step's logs (`loss`, `contrastive_accuracy`, `learning_rate`, and the
    probe's values when there is one). The file is flushed after every line, so a killed run leaves
    only complete lines. TensorBoard scalars use the same global step (Keras' own TensorBoard callback
    restarts its step count when a run resumes).
    """

    def __init__(self, path, tensorboard_dir=None):
        super().__init__()
        self.path = path
        self.tensorboard_dir = tensorboard_dir
        self._file = None
        self._writer = None

    def on_train_begin(self, logs=None):
        self._file = open(self.path, "a", encoding="utf-8")
        if self.tensorboard_dir:
            self._writer = tf.summary.create_file_writer(self.tensorboard_dir)

    def on_train_batch_end(self, batch, logs=None):
        step = _global_step(self.model)
        # np.mean: multi-worker logs arrive with shape [1] (see SimCLR._reducible).
        values = {name: float(np.mean(value)) for name, value in (logs or {}).items()}
        self._file.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self._file.flush()
        if self._writer is not None:
            with self._writer.as_default(step=step):
                for name, value in values.items():
                    tf.summary.scalar(name, value)

    def on_train_end(self, logs=None):
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class CheckpointEveryNSteps(keras.callbacks.Callback):
    """Saves `checkpoint_manager` every `every_n_steps` global steps and when training ends.

    The manager's checkpoint holds the model and optimizer (so the step count, momentum and the
    augmenter's random state resume too). TensorFlow writes the checkpoint files before it updates
    the `checkpoint` index, so an interrupted write leaves the previous checkpoint as the latest.
    """

    def __init__(self, checkpoint_manager, every_n_steps):
        super().__init__()
        self.checkpoint_manager = checkpoint_manager
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, batch, logs=None):
        step = _global_step(self.model)
        if self.every_n_steps > 0 and step % self.every_n_steps == 0:
            self.checkpoint_manager.save(checkpoint_number=step)

    def on_train_end(self, logs=None):
        step = _global_step(self.model)
        latest = self.checkpoint_manager.latest_checkpoint
        if latest is None or not latest.endswith(f"-{step}"):
            self.checkpoint_manager.save(checkpoint_number=step)


class StopAtStep(keras.callbacks.Callback):
    """Stops `fit` once the optimizer has taken `total_steps` steps (resumed runs end mid-epoch)."""

    def __init__(self, total_steps):
        super().__init__()
        self.total_steps = total_steps

    def on_train_batch_end(self, batch, logs=None):
        if _global_step(self.model) >= self.total_steps:
            self.model.stop_training = True
