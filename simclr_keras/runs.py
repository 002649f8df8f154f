"""The layout of a training run's --model_dir, shared by training, evaluation and export.

    MODEL_DIR/
      model_config.json    the SimCLR model's Keras config, enough to rebuild it without the flags
      checkpoints/         tf.train.Checkpoint(model=..., optimizer=...) files, latest in `checkpoint`
      flags.txt            the training flags, usable as a --flagfile
      train_log.jsonl      one JSON object per optimizer step
      tensorboard/         TensorBoard scalars by global step
      eval_results.json    the online probe's accuracy after training
"""

import json
import os

import keras
import tensorflow as tf

MODEL_CONFIG = "model_config.json"
CHECKPOINTS = "checkpoints"


def save_model_config(model, model_dir):
    with open(os.path.join(model_dir, MODEL_CONFIG), "w", encoding="utf-8") as file:
        json.dump(keras.saving.serialize_keras_object(model), file, indent=1)


def make_checkpoint_manager(model, model_dir, save_dir=None, max_to_keep=3):
    """A tf.train.CheckpointManager over model and optimizer in MODEL_DIR/checkpoints.

    Restores the latest checkpoint of MODEL_DIR if there is one. `save_dir` (default
    MODEL_DIR/checkpoints) is where new checkpoints go: a multi-worker worker other than the chief
    must take part in every save, restores from the chief's MODEL_DIR, and saves into scratch space.
    Returns (manager, restored_step); restored_step is 0 for a fresh run.
    """
    # Slot variables must exist before restoring, since Keras 3 optimizers create them in build().
    model.optimizer.build(model.trained_variables)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, CHECKPOINTS))
    directory = save_dir or os.path.join(model_dir, CHECKPOINTS)
    manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=max_to_keep)
    if latest:
        checkpoint.restore(latest).assert_existing_objects_matched()
    return manager, int(model.optimizer.iterations.numpy())


def load_model(model_dir):
    """Rebuilds the SimCLR model of a run and restores its latest checkpoint (without the optimizer).

    Raises FileNotFoundError naming what is missing when MODEL_DIR is not a finished training run.
    """
    config_path = os.path.join(model_dir, MODEL_CONFIG)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{model_dir} is not a training run: {MODEL_CONFIG} is missing.")
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, CHECKPOINTS))
    if latest is None:
        raise FileNotFoundError(f"{model_dir} holds no checkpoint in {CHECKPOINTS}/.")
    with open(config_path, encoding="utf-8") as file:
        model = keras.saving.deserialize_keras_object(json.load(file))
    # expect_partial: the optimizer's slots are in the checkpoint but not needed here.
    tf.train.Checkpoint(model=model).restore(latest).expect_partial().assert_existing_objects_matched()
    return model
