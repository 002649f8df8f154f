"""--proj_layers=0: SimCLR without a projection head, the loss on h itself (paper Fig. 8, "none";
the official code's proj_head_mode='none'), through training, checkpoints, export and evaluation."""

import glob
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from config_round_trip import assert_config_round_trip
from conftest import run_evaluate_main, run_train_main
from fixed_views import AlternatingViews

from simclr_keras import export
from simclr_keras.encoder import Encoder
from simclr_keras.heads import ProjectionHead
from simclr_keras.model_config import ModelConfig, build_model
from simclr_keras.train_config import TrainConfig

TINY = ["--batch_size=16", "--width_multiplier=0.125", "--optimizer=sgd", "--learning_rate=0.5", "--eval_batch_size=50"]


def nt_xent_loop(first, second, temperature):
    """The paper's L (Eq. 1, averaged over the 2N anchors) as a plain loop: view i's positive is view i + N."""
    views = np.concatenate([first, second]).astype(np.float64)
    views /= np.linalg.norm(views, axis=1, keepdims=True)
    count, losses = len(views), []
    for anchor in range(count):
        positive = (anchor + count // 2) % count
        logits = [views[anchor] @ views[other] / temperature for other in range(count) if other != anchor]
        positive_logit = views[anchor] @ views[positive] / temperature
        losses.append(-positive_logit + math.log(sum(math.exp(logit) for logit in logits)))
    return float(np.mean(losses))


def test_a_head_without_layers_is_the_identity_with_no_variables():
    head = ProjectionHead(num_layers=0)
    h = np.random.default_rng(0).normal(size=(4, 16)).astype("float32")
    for training in (True, False):
        np.testing.assert_array_equal(head(h, training=training), h)
    assert head.weights == [] and head.compute_output_shape((None, 16)) == (None, 16)
    np.testing.assert_array_equal(head(h, head_layer=0), h)
    with pytest.raises(ValueError, match=r"head_layer must be 0 \(h\).*proj_layers=0\), received head_layer=1\."):
        head(h, head_layer=1)
    assert_config_round_trip(head)


def test_the_logged_loss_is_nt_xent_of_the_encoders_training_mode_h():
    keras.utils.set_random_seed(3)
    model = build_model(ModelConfig(proj_layers=0, width_multiplier=0.125, image_size=16, temperature=0.5))
    model.augmenter = AlternatingViews()  # views the test can compute: the images and their mirror images
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    view1, view2 = AlternatingViews.views(images)
    # As the step sees them: both views through the encoder in one pass, BatchNorm on batch statistics.
    h = model.encoder(tf.concat([view1, view2], axis=0), training=True).numpy()  # (2N, D)
    expected = nt_xent_loop(h[:8], h[8:], temperature=0.5)
    history = model.fit(images, batch_size=8, epochs=1, verbose=0)
    assert history.history["loss"][0] == pytest.approx(expected, rel=1e-5)
    # No head: the optimizer sees exactly the encoder's variables.
    assert model.projection_head.weights == []
    assert {id(v) for v in model.trained_variables} == {id(v) for v in model.encoder.trainable_weights}


def test_only_simclr_runs_without_a_head():
    problems = TrainConfig(model_dir="/runs/a", method="moco_v2", proj_layers=0).validate()
    assert problems == [
        "proj_layers=0 (no projection head, the loss on h) applies to method=simclr; MoCo v2 keeps its head: use "
        "proj_layers >= 1."
    ]
    assert TrainConfig(model_dir="/runs/a", proj_layers=0, loss="hard_negative").validate() == []  # debiased / HCL
    assert TrainConfig(model_dir="/runs/a", proj_layers=-1).validate() == [
        "proj_layers must be an integer >= 0 (0: no projection head, the loss on h), got -1."
    ]


@pytest.fixture(scope="module")
def headless_run(cifar_100_images, tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("headless"))
    status, stdout, stderr = run_train_main(
        f"--dataset=folder:{cifar_100_images}", f"--model_dir={model_dir}", "--proj_layers=0", "--train_steps=2",
        "--checkpoint_every_n_steps=1", *TINY,
    )
    assert status == 0, stderr[-3000:]
    return cifar_100_images, model_dir, stdout


def test_a_headless_run_trains_the_probe_checkpoints_and_resumes(headless_run):
    data_dir, model_dir, stdout = headless_run
    assert "online linear probe on" in stdout and os.path.isfile(os.path.join(model_dir, "eval_results.json"))
    config = TrainConfig.from_run_dir(model_dir)
    assert config.proj_layers == 0
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints")))
    assert not [name for name in reader.get_variable_to_shape_map() if "projection_head" in name]
    status, stdout, stderr = run_train_main(f"--flagfile={model_dir}/flags.txt", "--train_steps=3")
    assert status == 0 and "resuming at step 2" in stdout, stderr[-3000:]


def test_the_encoder_and_its_export_give_h_and_z_equals_h(headless_run, tmp_path):
    data_dir, model_dir, _ = headless_run
    paths = sorted(glob.glob(os.path.join(data_dir, "test", "*", "*.jpg")))[:4]
    images = np.stack([tf.io.decode_jpeg(tf.io.read_file(path)).numpy() for path in paths])
    encoder = Encoder.from_run_dir(model_dir)
    features = encoder.features(images).numpy()
    with pytest.raises(ValueError, match=r"head_layer must be 0 \(h\)"):
        Encoder.from_run_dir(model_dir, head_layer=1)

    from simclr_keras import runs

    version_dir = export.export_encoder(runs.load_model(model_dir), str(tmp_path / "exports"))
    outputs = tf.saved_model.load(version_dir).signatures["serving_default"](images=tf.constant(images))
    # Without a head, the served projections are the embeddings themselves, and both are the run's h.
    np.testing.assert_array_equal(outputs["projections"].numpy(), outputs["embeddings"].numpy())
    np.testing.assert_allclose(outputs["embeddings"].numpy(), features, rtol=0, atol=1e-5)
    np.testing.assert_allclose(Encoder.from_export(version_dir).features(images).numpy(), features, rtol=0, atol=1e-5)
    assert np.abs(features).max() > 0.01


def test_evaluate_runs_on_h_and_refuses_a_head_layer_in_one_line(headless_run, capsys):
    data_dir, model_dir, _ = headless_run
    status, _, stderr = run_evaluate_main(capsys, f"--model_dir={model_dir}", "--protocol=knn", "--head_layer=1")
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert status != 0 and errors == [stderr.strip()], stderr[-2000:]
    assert errors[0].startswith("error: --head_layer must be 0 (h): this model was trained without a projection head")
    status, stdout, stderr = run_evaluate_main(
        capsys, f"--model_dir={model_dir}", f"--dataset=folder:{data_dir}", "--protocol=knn", "--knn_k=5"
    )
    assert status == 0 and "top-1" in stdout, stderr[-2000:]
