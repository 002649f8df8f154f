"""The package import (simclr_keras/__init__.py, keras_registration.py): cheap, and saved models still load.

Each behaviour is observed in a fresh interpreter, since this test process has imported TensorFlow
(conftest) and every module of the package already.
"""

import ast
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT

import simclr_keras as sk
from simclr_keras import keras_registration

# Modules a command line needs before its flags are validated: they must not load TensorFlow.
LIGHT_MODULES = [
    "simclr_keras",
    "simclr_keras.cli",
    "simclr_keras.keras_registration",
    "simclr_keras.run_lock",
    "simclr_keras.statistics",
    "simclr_keras.study_spec",
    "simclr_keras.write_failure",
    "simclr_keras.train_config",
    "simclr_keras.model_config",
    "simclr_keras.eval_config",
    "simclr_keras.dataset_sources",
    "simclr_keras.prepare_data",
]


def python(code, timeout=180):
    """Runs `code` in a fresh interpreter from a neutral directory; returns (returncode, stdout, stderr)."""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=os.path.dirname(REPO_ROOT)
    )
    return result.returncode, result.stdout, result.stderr


def imported_modules(*command):
    """The top-level modules a command imports, from `python -X importtime` (stderr lines `... | name`)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *command], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
    )
    names = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    return result, {name.split(".")[0] for name in names}


@pytest.mark.parametrize("module", LIGHT_MODULES)
def test_light_modules_import_no_tensorflow(module):
    result, modules = imported_modules("-c", f"import {module}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "simclr_keras" in modules  # the probe itself works: it sees our own import
    assert not modules & {"tensorflow", "keras"}, sorted(modules & {"tensorflow", "keras"})


@pytest.mark.parametrize("command", ["simclr_keras.train", "simclr_keras.evaluate"])
def test_command_line_help_loads_no_tensorflow(command):
    result, modules = imported_modules("-m", command, "--help")  # absl's --help exits with status 1
    assert "--model_dir" in result.stdout and "--dataset" in result.stdout
    assert "absl" in modules and "tensorflow" not in modules and "keras" not in modules


def test_exported_names_resolve_to_their_definitions():
    # Which module defines each name, read from the source (an independent reference to _EXPORTS).
    for name in sorted(sk._EXPORTS):
        module_name = sk._EXPORTS[name]
        path = os.path.join(REPO_ROOT, *module_name.split("."))
        path = path + ".py" if os.path.exists(path + ".py") else os.path.join(path, "__init__.py")
        if not os.path.exists(path):
            pytest.fail(f"sk.{name} is exported from {module_name}, which does not exist")
        with open(path, encoding="utf-8") as file:
            tree = ast.parse(file.read())
        defined = {node.name for node in tree.body if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
        assert name in defined, f"{module_name} does not define {name}"
        value = getattr(sk, name)
        assert value.__module__ == module_name and value.__name__ == name
    assert set(sk.__all__) == set(sk._EXPORTS) | {"data", "losses"}
    assert set(sk.__all__) <= set(dir(sk))
    assert sk.data.__name__ == "simclr_keras.data" and sk.plots.__name__ == "simclr_keras.plots"
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        sk.no_such_name  # noqa: B018


def test_the_registration_list_names_every_module_with_a_serializable_class():
    # The reference: every source file of the package that uses the decorator.
    registering = set()
    for directory, _, files in os.walk(os.path.join(REPO_ROOT, "simclr_keras")):
        for name in files:
            path = os.path.join(directory, name)
            if name.endswith(".py") and "register_keras_serializable(" in open(path, encoding="utf-8").read():
                module = os.path.relpath(path, REPO_ROOT)[: -len(".py")].replace(os.sep, ".")
                registering.add(module.removesuffix(".__init__"))
    registering.discard("simclr_keras.keras_registration")  # names the decorator in its docstring only
    assert registering == set(keras_registration.SERIALIZABLE_MODULES)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny SimCLR (our augmenter, ResNet layers, head, probe) compiled with LARS and our schedule."""
    import keras

    keras.utils.set_random_seed(1)
    model = sk.SimCLR(
        encoder=sk.resnet(depth=18, width_multiplier=0.0625, image_size=8),
        projection_head=sk.ProjectionHead(num_layers=2, output_dim=4),
        augmenter=sk.SimCLRAugmentation(8),
        num_classes=2,
    )
    schedule = sk.WarmupCosineDecay(0.1, total_steps=10, warmup_steps=2)
    model.compile(optimizer=sk.build_optimizer("lars", schedule, exclude_layers=["linear_probe"]))
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), np.uint8)
    model.fit(images, np.array([0, 1, 0, 1]), batch_size=4, epochs=1, verbose=0)
    path = str(tmp_path_factory.mktemp("saved") / "model.keras")
    model.save(path)
    features = keras.ops.convert_to_numpy(model.encoder(images.astype("float32") / 255.0, training=False))
    np.save(path + ".images.npy", images)
    np.save(path + ".features.npy", features)
    return path


LOAD = """
model = keras.models.load_model({path!r})
import numpy as np
images = np.load({path!r} + ".images.npy")
features = keras.ops.convert_to_numpy(model.encoder(images.astype("float32") / 255.0, training=False))
np.testing.assert_allclose(features, np.load({path!r} + ".features.npy"), rtol=1e-5, atol=1e-6)
print(type(model).__name__, type(model.optimizer).__name__, model.optimizer.get_config()["learning_rate"]["class_name"])
"""

IMPORT_ORDERS = [
    pytest.param("import simclr_keras\nimport keras", id="simclr_keras first"),
    pytest.param("import keras\nimport simclr_keras", id="keras first", marks=pytest.mark.slow),
    pytest.param(
        "import simclr_keras\nimport tensorflow as tf\nkeras = tf.keras", id="tensorflow after simclr_keras",
        marks=pytest.mark.slow,
    ),  # fmt: skip
    pytest.param("import simclr_keras.cli\nimport keras", id="a light submodule, then keras", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("imports", IMPORT_ORDERS)
def test_a_saved_model_loads_in_a_new_process_after_import_simclr_keras(saved_model, imports):
    returncode, stdout, stderr = python(imports + LOAD.format(path=saved_model))
    assert returncode == 0, stderr[-3000:]
    assert stdout.split() == ["SimCLR", "LARS", "WarmupCosineDecay"]


@pytest.mark.slow
def test_without_import_simclr_keras_keras_cannot_load_it(saved_model):
    # The control: Keras alone does not find our classes, so the test above exercises the registration.
    returncode, _, stderr = python("import keras" + LOAD.format(path=saved_model))
    assert returncode != 0 and "Could not locate class" in stderr
