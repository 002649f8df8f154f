"""The layout of a training run's --model_dir, shared by training, evaluation and export.

    MODEL_DIR/
      model_config.json    the SimCLR model's Keras config, enough to rebuild it without the flags
      classes.json         the label -> class name mapping of the training data (sorted folder names)
      checkpoints/         tf.train.Checkpoint(model=..., optimizer=..., random_states=...) files,
                           latest in `checkpoint`
      flags.txt            the training flags, usable as a --flagfile
      train_log.jsonl      one JSON object per optimizer step
      tensorboard/         TensorBoard scalars by global step
      eval_results.json    the online probe's accuracy after training
      train.lock           locked (flock) by the training process while it runs, naming its PID
                           (simclr_keras.run_lock); evaluation and export never lock it
      training_curves.png  loss, learning rate, contrastive and probe accuracy by step (simclr_keras.plots)
      augmented_pairs.png  a few training images, each with two random views from the model's augmenter
"""

import json
import os

import keras
import tensorflow as tf
from absl import logging

MODEL_CONFIG = "model_config.json"
CLASSES = "classes.json"
CHECKPOINTS = "checkpoints"
EVAL_RESULTS = "eval_results.json"


def _write_json(path, value, indent=1):
    """Writes JSON through a temporary file and a rename, so a kill never leaves half a file."""
    temporary_path = f"{path}.tmp"
    with open(temporary_path, "w", encoding="utf-8") as file:
        json.dump(value, file, indent=indent)
    os.replace(temporary_path, path)


def save_model_config(model, model_dir):
    _write_json(os.path.join(model_dir, MODEL_CONFIG), keras.saving.serialize_keras_object(model))


def save_class_names(class_names, model_dir, dataset=None):
    """Writes MODEL_DIR/classes.json: {"dataset", "class_names"}, class_names[label] naming each label."""
    _write_json(os.path.join(model_dir, CLASSES), {"dataset": dataset, "class_names": list(class_names)})


def save_eval_results(results, model_dir):
    """Writes MODEL_DIR/eval_results.json (through a rename: a reader never sees half of it)."""
    _write_json(os.path.join(model_dir, EVAL_RESULTS), results, indent=2)


def random_states(model):
    """The model's random-number states (e.g. its augmenter's SeedGenerator), keyed by position.

    Keras keeps them out of `model.weights`, and tf.train.Checkpoint(model=...) does not save them:
    without them a resumed run would restart its augmentation sequence from the seed.
    """
    weight_ids = {id(weight) for weight in model.weights}
    states = [variable for variable in model.variables if id(variable) not in weight_ids]
    return {f"state_{index}": state.value for index, state in enumerate(states)}


def _checkpoint_candidates(checkpoint_dir):
    """The checkpoints recorded in checkpoint_dir's `checkpoint` index, latest first."""
    state = tf.train.get_checkpoint_state(checkpoint_dir)
    if state is None:
        return []
    # get_checkpoint_state already prefixes the relative paths of the index with checkpoint_dir.
    paths = [state.model_checkpoint_path] + list(reversed(state.all_model_checkpoint_paths))
    return [path for index, path in enumerate(paths) if path and path not in paths[:index]]


def make_checkpoint_manager(model, model_dir, save_dir=None, max_to_keep=3):
    """A tf.train.CheckpointManager over model and optimizer in MODEL_DIR/checkpoints.

    Restores the latest checkpoint of MODEL_DIR if there is one, with the model's random states
    (`random_states`; checkpoints written before they were saved restore without them). Should the
    latest fail to restore (a damaged file), the next older one recorded is tried, with a warning.
    `save_dir` (default MODEL_DIR/checkpoints) is where new checkpoints go: a multi-worker worker
    other than the chief must take part in every save, restores from the chief's MODEL_DIR, and
    saves into scratch space. Returns (manager, restored_step); restored_step is 0 for a fresh run.

    Raises ValueError naming the checkpoints when there are some and none restores.
    """
    # Slot variables must exist before restoring, since Keras 3 optimizers create them in build().
    model.optimizer.build(model.trained_variables)
    states = random_states(model)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer, random_states=states)
    directory = save_dir or os.path.join(model_dir, CHECKPOINTS)
    manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=max_to_keep)
    failures = []
    for path in _checkpoint_candidates(os.path.join(model_dir, CHECKPOINTS)):
        try:
            # expect_partial after the assertion: the random states are left to the read below.
            status = tf.train.Checkpoint(model=model, optimizer=model.optimizer).restore(path)
            status.assert_existing_objects_matched().expect_partial()
        except Exception as error:  # a damaged file raises OpError, IndexError...; a mismatch AssertionError
            failures.append(f"{path} ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})")
            continue
        # read(): the states are absent from older checkpoints, which expect_partial allows.
        tf.train.Checkpoint(random_states=states).read(path).expect_partial()
        if failures:
            logging.warning("restored %s; newer checkpoints failed to restore: %s", path, "; ".join(failures))
        break
    else:
        if failures:
            raise ValueError(f"no checkpoint in {os.path.join(model_dir, CHECKPOINTS)} restores: {'; '.join(failures)}")
    return manager, int(model.optimizer.iterations.numpy())


def load_class_names(model_dir):
    """The class names MODEL_DIR/classes.json records (class_names[label]), or None without that file."""
    path = os.path.join(model_dir, CLASSES)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as file:
        return tuple(json.load(file)["class_names"])


def load_model(model_dir, restore=True):
    """Rebuilds the SimCLR model of a run and restores its latest checkpoint (without the optimizer).

    With restore=False the rebuilt model keeps its fresh initialisation (seeded by
    `keras.utils.set_random_seed`): the random-encoder baseline of the run's architecture.
    Raises FileNotFoundError naming what is missing when MODEL_DIR is not a finished training run.
    """
    config_path = os.path.join(model_dir, MODEL_CONFIG)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{model_dir} is not a training run: {MODEL_CONFIG} is missing.")
    if restore and tf.train.latest_checkpoint(os.path.join(model_dir, CHECKPOINTS)) is None:
        raise FileNotFoundError(f"{model_dir} holds no checkpoint in {CHECKPOINTS}/.")
    with open(config_path, encoding="utf-8") as file:
        model = keras.saving.deserialize_keras_object(json.load(file))
    if restore:
        restore_latest_checkpoint(model, model_dir)
    return model


def restore_latest_checkpoint(model, model_dir, attempts=10):
    """Restores the model's weights (not the optimizer's) from MODEL_DIR's latest checkpoint; returns its path.

    A run may be training while it is read (evaluation and export take no lock): its checkpoint
    manager deletes checkpoints beyond max_to_keep, so the latest one read here can vanish before
    or while it is restored. Then the new latest is tried, up to `attempts` times. Raises
    FileNotFoundError when there is no checkpoint, or when they keep vanishing.
    """
    directory = os.path.join(model_dir, CHECKPOINTS)
    tried = []
    for _ in range(attempts):
        latest = tf.train.latest_checkpoint(directory)
        if latest is None:
            break
        try:
            # expect_partial: the optimizer's slots are in the checkpoint but not needed here.
            tf.train.Checkpoint(model=model).restore(latest).expect_partial().assert_existing_objects_matched()
            return latest
        except (tf.errors.NotFoundError, tf.errors.DataLossError):
            if os.path.exists(latest + ".index") and latest == tf.train.latest_checkpoint(directory):
                raise  # still there and still the latest: damaged, not rotated away
            tried.append(os.path.basename(latest))
    if not tried:
        raise FileNotFoundError(f"{model_dir} holds no checkpoint in {CHECKPOINTS}/.")
    raise FileNotFoundError(
        f"{model_dir}: checkpoints {', '.join(tried)} were deleted while being read (a run saving faster than "
        "they restore); try again, or read a run that is not training."
    )
