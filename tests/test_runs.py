"""simclr_keras.runs: the run directory a training run leaves, and rebuilding its model.

The checkpoint fall-back after damage is tested with the training command (tests/test_train_cli.py).
"""

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from simclr_keras import runs


def latest_step(model_dir):
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    return int(latest.rsplit("-", 1)[-1]) if latest else None


def test_a_training_run_leaves_the_documented_layout(tiny_run_dir):
    model_dir = tiny_run_dir.model_dir
    for name in ("model_config.json", "classes.json", "flags.txt", "train_log.jsonl", "eval_results.json",
                 "training_curves.png", "augmented_pairs.png", "tensorboard"):  # fmt: skip
        assert os.path.exists(os.path.join(model_dir, name)), name
    # 3 steps with a checkpoint every 2: steps 2 and 3 are kept, 3 is the latest.
    assert latest_step(model_dir) == 3
    checkpoints = tf.train.get_checkpoint_state(os.path.join(model_dir, "checkpoints")).all_model_checkpoint_paths
    assert [os.path.basename(path) for path in checkpoints] == ["ckpt-2", "ckpt-3"]
    with open(os.path.join(model_dir, "train_log.jsonl"), encoding="utf-8") as file:
        assert [json.loads(line)["step"] for line in file] == [1, 2, 3]
    with open(os.path.join(model_dir, "classes.json"), encoding="utf-8") as file:
        class_names = json.load(file)["class_names"]
    assert class_names == sorted(os.listdir(os.path.join(tiny_run_dir.data_dir, "train")))  # the folder's classes
    assert runs.load_class_names(model_dir) == tuple(class_names)
    assert os.path.isfile(os.path.join(tiny_run_dir.export_version_dir, "saved_model.pb"))


def test_load_model_restores_the_weights_training_ended_with(tiny_run_dir):
    model = runs.load_model(tiny_run_dir.model_dir)
    # The reference: the export the training process wrote from its final weights, read back by
    # TensorFlow alone (the SavedModel's own variables and graph).
    serve = tf.saved_model.load(tiny_run_dir.export_version_dir).signatures["serving_default"]
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), np.uint8)
    expected = serve(images=tf.constant(images))["embeddings"].numpy()
    embeddings = model.encoder(model.augmenter(images, training=False), training=False).numpy()
    np.testing.assert_allclose(embeddings, expected, rtol=1e-5, atol=1e-5)
    fresh = runs.load_model(tiny_run_dir.model_dir, restore=False)
    unrestored = fresh.encoder(fresh.augmenter(images, training=False), training=False).numpy()
    assert np.abs(unrestored - expected).max() > 1e-3


def test_load_model_names_what_a_directory_lacks(tiny_run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a training run: model_config.json is missing"):
        runs.load_model(str(tmp_path))
    shutil.copy(os.path.join(tiny_run_dir.model_dir, "model_config.json"), tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no checkpoint in checkpoints/"):
        runs.load_model(str(tmp_path))


def _rotate_on_first_restore(monkeypatch, model_dir, new_weights_model, number):
    """Makes the first checkpoint restore behave as if a training process saved checkpoint `number`
    (max_to_keep=1, deleting the others) between the reader's look at the latest and its restore."""
    real_restore = tf.train.Checkpoint.restore
    rotated = []

    def restore(self, save_path, *args, **kwargs):
        if not rotated:
            rotated.append(save_path)
            manager = tf.train.CheckpointManager(
                tf.train.Checkpoint(model=new_weights_model), os.path.join(model_dir, "checkpoints"), max_to_keep=1
            )
            manager.save(checkpoint_number=number)
            assert not os.path.exists(save_path + ".index")  # the path about to be read is gone
        return real_restore(self, save_path, *args, **kwargs)

    monkeypatch.setattr(tf.train.Checkpoint, "restore", restore)
    return rotated


@pytest.mark.parametrize("reader", ["load_model", "Encoder.from_run_dir"])
def test_a_run_read_while_training_deletes_its_latest_checkpoint_restores_the_newer_one(
    tiny_run_dir, tmp_path, monkeypatch, reader
):
    # Evaluation and export read a run without its lock; its checkpoint manager keeps max_to_keep and
    # deletes the rest, so the checkpoint found as the latest can vanish before it is read.
    from simclr_keras.encoder import Encoder

    model_dir = str(tmp_path / "run")
    shutil.copytree(tiny_run_dir.model_dir, model_dir)
    newer = runs.load_model(model_dir)
    for variable in newer.encoder.weights:
        variable.assign(variable + 0.25)  # the weights a later training step would have written
    expected = [variable.numpy() for variable in newer.encoder.weights]
    rotated = _rotate_on_first_restore(monkeypatch, model_dir, newer, number=9)
    if reader == "load_model":
        encoder_weights, restored = runs.load_model(model_dir).encoder.weights, None
    else:
        encoder = Encoder.from_run_dir(model_dir)
        encoder_weights, restored = encoder.backbone.weights, encoder.checkpoint
    assert rotated and rotated[0].endswith("ckpt-3")
    for variable, value in zip(encoder_weights, expected, strict=True):
        np.testing.assert_array_equal(variable.numpy(), value)
    if restored is not None:
        assert restored == os.path.join(model_dir, "checkpoints", "ckpt-9")
