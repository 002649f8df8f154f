"""Tests for simclr_keras.official: the official SimCLR TF2 SavedModels as SimCLR models.

The references are the facts in ../shared/official_simclr/ (made by running the official tf2 code:
variable lists of ResNet-50 1x sk0/sk1 and a numeric oracle of its stem and block group 1) and
tests/official_reference.py, a plain-TensorFlow model of the official network that is itself
checked against those facts first.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import CIFAR10_DIR
from official_reference import OfficialNetwork, save_fake_official
from simclr_keras import official
from simclr_keras.backbones import resnet


def _facts_dir():
    """Where SIMCLR_OFFICIAL_FACTS_DIR says; else shared/official_simclr beside the repository, or in
    the shared folder that holds the offline CIFAR-10 copy (shared/datasets/cifar10, conftest.py)."""
    if "SIMCLR_OFFICIAL_FACTS_DIR" in os.environ:
        return os.environ["SIMCLR_OFFICIAL_FACTS_DIR"]
    beside = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "official_simclr")
    if os.path.isdir(beside):
        return beside
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(CIFAR10_DIR))), "official_simclr")


FACTS_DIR = _facts_dir()
SK = official.OFFICIAL_SK_RATIO
TINY = dict(width=1 / 16, proj_dim=16, num_classes=10)  # the real layout at a few hundred thousand weights


def _facts(name):
    path = os.path.join(FACTS_DIR, name)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} is missing: the official facts live in ../shared/official_simclr/; set "
            "SIMCLR_OFFICIAL_FACTS_DIR to the folder that holds them"
        )
    return path


def _official_list(sk):
    with open(_facts(f"r50_1x_sk{sk}_variables.json"), encoding="utf-8") as file:
        return [(v["name"].split(":")[0], tuple(v["shape"]), v["trainable"]) for v in json.load(file)["variables"]]


def _oracle(sk):
    arrays = np.load(_facts(f"r50_1x_sk{sk}_stem_group1.npz"))
    weights = {key[len("weight:"):]: arrays[key] for key in arrays.files if key.startswith("weight:")}
    outputs = {key[len("output:"):]: arrays[key] for key in arrays.files if key.startswith("output:")}
    return arrays["images"], weights, outputs


@pytest.mark.parametrize("sk", [0, 1])
def test_reference_names_equal_the_official_lists(sk):
    # The reference's Keras-2 naming, run for ResNet-50 1x, gives the official list exactly (order too).
    assert OfficialNetwork(depth=50, width=1, sk_ratio=SK * sk).variables == _official_list(sk)


def test_reference_forward_reproduces_the_oracle():
    images, weights, outputs = _oracle(0)
    network = OfficialNetwork(depth=50, sk_ratio=0.0)
    values = {name.split(":")[0]: value for name, value in weights.items()}
    network.groups, network.head, network.classifier = network.groups[:1], [], None
    result = network.forward(values, tf.constant(images))
    for name in ("initial_conv", "initial_max_pool", "block_group1"):
        np.testing.assert_allclose(result[name], outputs[name], atol=2e-5)
    # sk1: the oracle holds only the first of the three stem convolutions, so block group 1 is
    # checked from the official initial_max_pool.
    images, weights, outputs = _oracle(1)
    network = OfficialNetwork(depth=50, sk_ratio=SK)
    values = {name.split(":")[0]: value for name, value in weights.items()}
    features = tf.constant(outputs["initial_max_pool"])
    for block in network.groups[0]:
        features = network._apply_block(values, block, features, False)
    np.testing.assert_allclose(features, outputs["block_group1"], atol=2e-5)


def _assign_subset(model, weights, variant):
    """Writes the oracle's weights (a subset of a checkpoint) through the importer's layout."""
    layout = official.official_layout(variant)
    canonical = official.canonical_names(weights)
    assert set(canonical) <= set(layout)
    official.assign(model, [(layout[name][1], weights[name_in_file]) for name, name_in_file in canonical.items()])


@pytest.mark.parametrize("sk", [0, 1])
def test_imported_stem_and_group1_reproduce_the_official_outputs(sk):
    images, weights, outputs = _oracle(sk)
    variant = official.OfficialVariant(50, 1, SK * sk, projection_layers=3, projection_dim=128, num_classes=None)
    model = official.build_model(variant)
    _assign_subset(model, weights, variant)
    encoder = model.encoder
    group1 = encoder.get_layer("group1_block3_out").output
    if sk == 0:
        probe = keras.Model(encoder.input, [encoder.get_layer(name).output for name in ("stem_conv", "stem_pool")] + [group1])
        ours = dict(zip(["initial_conv", "initial_max_pool", "block_group1"], probe(images, training=False)))
    else:  # the oracle has no weights for stem convolutions 2 and 3: start from the official max-pool
        probe = keras.Model(encoder.get_layer("stem_pool").output, group1)
        ours = {"block_group1": probe(outputs["initial_max_pool"], training=False)}
    for name, value in ours.items():
        error = float(np.max(np.abs(np.asarray(value) - outputs[name])))
        print(f"sk{sk} {name}: largest absolute error {error:.2e} (largest value {np.max(np.abs(outputs[name])):.2f})")
        assert error < 2e-5, name


V2 = [
    dict(depth=depth, width=width, sk_ratio=sk)
    for depth in (50, 101, 152)
    for width in (1, 2, 3)
    for sk in (0.0, SK)
]
V1 = [dict(depth=50, width=width, sk_ratio=0.0, proj_layers=0) for width in (1, 2, 4)]


@pytest.mark.parametrize("settings", V2 + V1, ids=lambda s: f"r{s['depth']}_{s['width']}x_sk{int(s['sk_ratio'] > 0)}_head{s.get('proj_layers', 3)}")
def test_every_official_variable_is_consumed_exactly_once(settings):
    network = OfficialNetwork(**settings)
    shapes = {f"{name}:0": shape for name, shape, _ in network.variables}
    variant = official.detect_variant(shapes)
    assert (variant.depth, variant.width_multiplier, variant.selective_kernel_ratio) == (
        settings["depth"], settings["width"], settings["sk_ratio"]
    )
    assert variant.projection_layers == settings.get("proj_layers", 3) and variant.num_classes == 1000
    matched = official.match_layout(variant, shapes)
    assert sorted(name for name, _ in matched) == sorted(shapes)
    assert len({target for _, target in matched}) == len(shapes)


def test_counters_offset_by_earlier_layers_do_not_matter():
    # As if the writing process had created 7 layers of every kind before the model.
    network = OfficialNetwork(depth=50, sk_ratio=SK)
    shifted = OfficialNetwork(depth=50, sk_ratio=SK, counter_offset=7)
    assert shifted.variables[0][0] == "resnet/conv2d_fixed_padding_7/conv2d_7/kernel"
    reference = dict(official.match_layout(official.detect_variant(_shapes_of(network)), _shapes_of(network)))
    matched = dict(official.match_layout(official.detect_variant(_shapes_of(shifted)), _shapes_of(shifted)))
    assert [reference[a] for a, _, _ in network.variables] == [matched[b] for b, _, _ in shifted.variables]


def _shapes_of(network):
    return {name: shape for name, shape, _ in network.variables}


@pytest.mark.parametrize(
    "depth, sk",
    [(50, 0.0), (50, SK), pytest.param(101, SK, marks=pytest.mark.slow), pytest.param(152, 0.0, marks=pytest.mark.slow)],
)
def test_every_keras_weight_receives_an_official_value(depth, sk):
    # At a tiny width, so that the Keras model is cheap; the layout is the same at every width.
    network = OfficialNetwork(depth=depth, sk_ratio=sk, **TINY)
    shapes = {name: shape for name, shape, _ in network.variables}
    variant = official.detect_variant(shapes)
    model = official.build_model(variant)
    targets = {}
    for name, target in official.match_layout(variant, shapes):
        variable = official.target_variable(model, target)
        assert tuple(variable.shape) == shapes[name], name
        targets[id(variable)] = name
    weights = model.encoder.weights + model.projection_head.weights + model.probe.classifier.weights
    assert len(targets) == len(shapes) == len(weights)
    assert all(id(weight) in targets for weight in weights)


@pytest.fixture(scope="module")
def make_fake_official(tmp_path_factory):
    """sk -> (path, network, values) of a tiny ResNet-50 SavedModel in the official layout, made once."""
    made = {}

    def make(sk):
        if sk not in made:
            network = OfficialNetwork(depth=50, sk_ratio=SK * sk, **TINY)
            values = network.random_values(seed=sk)
            path = save_fake_official(tmp_path_factory.mktemp(f"r50_sk{sk}") / "saved_model", network, values)
            made[sk] = (path, network, values)
        return made[sk]

    return make


@pytest.fixture(params=[0, 1], ids=["sk0", "sk1"])
def fake_official(request, make_fake_official):
    return make_fake_official(request.param)


def test_fake_official_saved_model_imports_end_to_end(fake_official):
    path, network, values = fake_official
    model, variant, errors = official.import_official_simclr(path)
    assert variant.name == f"r50_0.0625x_sk{int(network.sk_ratio > 0)}" and variant.num_classes == 10
    # The imported model computes what the official network computes on the written values...
    assert set(errors) == {"final_avg_pool", "proj_head_output", "logits_sup"}
    assert max(errors.values()) < 1e-5, errors
    # ...and holds exactly the values written, each once.
    written = sorted(value.tobytes() for value in values.values())
    imported = model.encoder.weights + model.projection_head.weights + model.probe.classifier.weights
    assert sorted(np.asarray(weight).tobytes() for weight in imported) == written


def test_imported_model_reproduces_the_reference_at_224_pixels_and_in_training_mode(fake_official):
    path, network, values = fake_official
    model = official.from_official_simclr(path)
    by_name = {name: tf.constant(value) for name, value in values.items()}
    rng = np.random.default_rng(1)
    # Inference first: a training call updates our moving statistics (the reference's stay).
    # Training: BatchNorm with batch statistics on both sides; 16 images, since the selective-kernel
    # attention normalises over one value per image and amplifies rounding at smaller batches.
    for training, images in ((False, rng.uniform(size=(2, 224, 224, 3))), (True, rng.uniform(size=(16, 64, 64, 3)))):
        images = images.astype(np.float32)
        expected = network.forward(by_name, tf.constant(images), training=training)
        h = model.encoder(images, training=training)
        scale = np.abs(expected["final_avg_pool"]).max()
        np.testing.assert_allclose(h, expected["final_avg_pool"], rtol=0, atol=(1e-3 if training else 1e-5) * scale)
        z = model.projection_head(expected["final_avg_pool"], training=training)  # the head on the reference's h
        scale = np.abs(expected["proj_head_output"]).max()
        np.testing.assert_allclose(z, expected["proj_head_output"], rtol=0, atol=1e-4 * scale)


@pytest.mark.slow
def test_v1_checkpoint_without_projection_head_gets_a_new_two_layer_head(tmp_path):
    network = OfficialNetwork(depth=50, width=1 / 16, proj_layers=0, num_classes=10)
    path = save_fake_official(tmp_path / "saved_model", network, network.random_values())
    model, variant, errors = official.import_official_simclr(path)
    assert variant.projection_layers == 0 and set(errors) == {"final_avg_pool", "logits_sup"}
    assert model.projection_head.num_layers == 2 and model.projection_head.output_dim == 128


def _shapes(**settings):
    return {f"{name}:0": shape for name, shape, _ in OfficialNetwork(**settings).variables}


def test_missing_extra_and_misshapen_variables_are_named():
    shapes = _shapes(depth=50, **TINY)
    variant = official.detect_variant(shapes)
    name = "resnet/block_group3/bottleneck_block_8/batch_norm_relu_29/sync_batch_normalization_29/gamma:0"
    missing = {key: value for key, value in shapes.items() if key != name}
    with pytest.raises(ValueError, match=r"bottleneck_block\[1\]/batch_norm_relu\[1\]/batch_normalization\[0\]/gamma "
                                         r"\(shape \(16,\), for encoder layer group3_block2_bn2\) is missing"):
        official.match_layout(variant, missing, "DIR")
    extra = {**shapes, "resnet/block_group1/bottleneck_block/se_layer/conv2d_99/kernel:0": (1, 1, 4, 4)}
    with pytest.raises(ValueError, match=r"^DIR: unexpected variable resnet/block_group1/bottleneck_block/se_layer/conv2d_99"):
        official.match_layout(variant, extra, "DIR")
    misshapen = {**shapes, name: (17,)}
    with pytest.raises(ValueError, match=r"variable .*sync_batch_normalization_29/gamma:0 has shape \(17,\), an official "
                                         r"r50_0.0625x_sk0 model has \(16,\) there .*nothing was imported"):
        official.match_layout(variant, misshapen, "DIR")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda shapes: {k: v for k, v in shapes.items() if "bottleneck_block_15/" not in k}, r"\(3, 4, 6, 2\) blocks per group, an unsupported variant"),
        (lambda shapes: {k.replace("bottleneck_block", "residual_block"): v for k, v in shapes.items()}, "ResNet-18/34 .*unsupported variant"),
        (lambda shapes: {"dense/kernel:0": (3, 4)}, "not an official SimCLR SavedModel: none of its 1 variables"),
    ],
)
def test_unsupported_variants_fail_clearly(change, message):
    with pytest.raises(ValueError, match=message):
        official.detect_variant(change(_shapes(depth=50, **TINY)))


def test_directories_that_are_not_official_saved_models_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="holds no saved_model.pb"):
        official.from_official_simclr(str(tmp_path))
    module = tf.Module()
    module.weight = tf.Variable(1.0)
    module.serve = tf.function(lambda x: x * module.weight, input_signature=[tf.TensorSpec([], tf.float32)])
    tf.saved_model.save(module, str(tmp_path / "other"))
    with pytest.raises(ValueError, match="not an official SimCLR SavedModel: it lacks the __call__"):
        official.from_official_simclr(str(tmp_path / "other"))


def test_a_wrong_mapping_is_caught_by_the_output_check(make_fake_official, monkeypatch):
    path, network, values = make_fake_official(0)
    original = official.encoder_layout

    def swapped(variant):  # two blocks' first convolutions exchanged: same shapes, wrong network
        layout = dict(original(variant))
        first = "resnet[0]/block_group1[0]/bottleneck_block[1]/conv2d_fixed_padding[0]/conv2d[0]/kernel"
        second = first.replace("bottleneck_block[1]", "bottleneck_block[2]")
        layout[first], layout[second] = layout[second], layout[first]
        return layout

    monkeypatch.setattr(official, "encoder_layout", swapped)
    with pytest.raises(ValueError, match="final_avg_pool differs from the SavedModel's"):
        official.from_official_simclr(path)


def _run_cli(*arguments):
    return subprocess.run(
        [sys.executable, "-m", "simclr_keras.import_official", *arguments], capture_output=True, text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )


@pytest.mark.slow
def test_command_line_writes_an_export_and_a_run(tmp_path):
    from simclr_keras import export, runs

    network = OfficialNetwork(depth=50, **TINY)
    values = network.random_values(seed=3)
    path = save_fake_official(tmp_path / "saved_model", network, values)
    result = _run_cli(f"--saved_model={path}", f"--export_dir={tmp_path / 'export'}", f"--model_dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr
    assert "imported r50_0.0625x_sk0" in result.stdout and "largest relative error" in result.stdout
    images = np.random.default_rng(2).integers(0, 256, size=(2, 256, 300, 3), dtype=np.uint8)
    encoder = export.load_encoder(str(tmp_path / "export"))
    run_model = runs.load_model(str(tmp_path / "run"))
    views = run_model.augmenter(images, training=False)  # the official 87.5% centre crop, 224 px
    np.testing.assert_allclose(encoder(images), run_model.encoder(views, training=False), rtol=1e-5, atol=1e-5)
    expected = network.forward({k: tf.constant(v) for k, v in values.items()}, views)["logits_sup"]
    np.testing.assert_allclose(run_model.probe(run_model.encoder(views)), expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())

    failed = _run_cli(f"--saved_model={tmp_path}", f"--export_dir={tmp_path / 'other'}")
    # The last line of stderr (TensorFlow logs its own lines before it); no traceback.
    last_line = failed.stderr.strip().splitlines()[-1]
    assert failed.returncode == 1 and last_line.startswith(f"error: --saved_model={tmp_path}: {tmp_path} holds no saved_model.pb")
    assert "Traceback" not in failed.stderr and not os.path.exists(tmp_path / "other")
    failed = _run_cli(f"--saved_model={path}")
    assert failed.returncode == 1 and failed.stderr.strip().splitlines()[-1].startswith("error: --export_dir or --model_dir")


def test_readme_example_runs(make_fake_official):
    path, network, values = make_fake_official(0)
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "serving.md"), encoding="utf-8") as file:
        readme = file.read()  # the official weights' section, moved there from the README
    section = readme[readme.index("## Official SimCLR weights"):]
    example = section[section.index("```python\n") + len("```python\n"):section.index("```\n", section.index("```python"))]
    assert '"r50_1x_sk0/saved_model"' in example, "the README example changed: update this test"
    namespace = {}
    exec(compile(example.replace('"r50_1x_sk0/saved_model"', repr(path)), "README", "exec"), namespace)
    expected = network.forward({k: tf.constant(v) for k, v in values.items()}, namespace["views"])
    np.testing.assert_allclose(namespace["h"], expected["final_avg_pool"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(namespace["logits"], expected["logits_sup"], rtol=1e-3, atol=1e-4)
    assert tuple(namespace["views"].shape) == (2, 224, 224, 3)
