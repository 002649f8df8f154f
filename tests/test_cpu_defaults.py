"""simclr_keras turns TensorFlow's oneDNN kernels on before TensorFlow loads, and they compute what Eigen's do."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from simclr_keras import cpu_defaults

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code, environ):
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPOSITORY, env={**environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def _environment_without_choice():
    return {name: value for name, value in os.environ.items() if name != cpu_defaults.ONEDNN_VARIABLE}


@pytest.mark.parametrize(
    "environ, system, machine, loaded, expected",
    [
        ({}, "Linux", "x86_64", False, "1"),  # an AVX2-only CPU would otherwise get Eigen's kernels
        ({"TF_ENABLE_ONEDNN_OPTS": "0"}, "Linux", "x86_64", False, "0"),  # the user's choice stands
        ({}, "Linux", "x86_64", True, None),  # TensorFlow read it already: setting it would mislead
        ({}, "Linux", "aarch64", False, None),
        ({}, "Darwin", "x86_64", False, None),
    ],
)
def test_enable_onednn_sets_the_variable_only_where_it_is_unset(environ, system, machine, loaded, expected):
    environ = dict(environ)
    cpu_defaults.enable_onednn(environ, system=system, machine=machine, tensorflow_loaded=loaded)
    assert environ.get(cpu_defaults.ONEDNN_VARIABLE) == expected


@pytest.mark.skipif(sys.platform != "linux", reason="the default applies to Linux x86-64")
def test_importing_the_package_turns_onednn_on_before_tensorflow_loads():
    code = (
        "import simclr_keras.losses, os\n"  # any module of the package: its __init__ runs first
        "from tensorflow.python.util import _pywrap_util_port\n"
        "print(os.environ.get('TF_ENABLE_ONEDNN_OPTS'), _pywrap_util_port.IsMklEnabled())"
    )
    assert _python(code, _environment_without_choice()) == "1 True"
    assert _python(code, {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "0"}) == "0 False"


_TRAINING_STEP = """
import json
import simclr_keras.backbones as backbones
import keras, numpy as np, tensorflow as tf
from tensorflow.python.util import _pywrap_util_port
keras.utils.set_random_seed(0)
encoder = backbones.resnet(18, width_multiplier=0.125, image_size=32)
images = tf.constant(np.random.default_rng(0).uniform(size=(8, 32, 32, 3)), tf.float32)
with tf.GradientTape() as tape:
    representation = encoder(images, training=True)
    loss = tf.reduce_sum(tf.sin(representation))  # a gradient that differs per feature
gradients = tape.gradient(loss, encoder.trainable_variables)
print(json.dumps({
    "onednn": bool(_pywrap_util_port.IsMklEnabled()),
    "representation": representation.numpy().tolist(),
    "gradients": [gradient.numpy().ravel().tolist() for gradient in gradients],
    "moving_statistics": np.concatenate([v.numpy().ravel() for v in encoder.non_trainable_variables]).tolist(),
}))
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="oneDNN against Eigen needs TensorFlow's Linux x86-64 build")
def test_onednn_avx2_training_step_equals_eigens():
    """A training-mode forward and backward pass of ResNet-18 (convolutions, fused BatchNorm, ReLU) on
    oneDNN's AVX2 kernels (what AVX2-only CPUs now get) against TensorFlow's Eigen kernels (what they had)."""
    avx2 = {**_environment_without_choice(), "ONEDNN_MAX_CPU_ISA": "AVX2"}
    onednn = json.loads(_python(_TRAINING_STEP, {**avx2, "TF_ENABLE_ONEDNN_OPTS": "1"}))
    eigen = json.loads(_python(_TRAINING_STEP, {**avx2, "TF_ENABLE_ONEDNN_OPTS": "0"}))
    assert onednn["onednn"] and not eigen["onednn"]
    np.testing.assert_allclose(onednn["representation"], eigen["representation"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(onednn["moving_statistics"], eigen["moving_statistics"], rtol=1e-4, atol=1e-5)
    assert len(onednn["gradients"]) == len(eigen["gradients"]) == 60  # 20 kernels, 20 gammas, 20 betas
    for with_onednn, with_eigen in zip(onednn["gradients"], eigen["gradients"]):
        with_onednn, with_eigen = np.asarray(with_onednn), np.asarray(with_eigen)
        # Relative to the gradient's scale: sums over 8 x 32 x 32 positions round differently.
        assert np.abs(with_onednn - with_eigen).max() <= 1e-4 * np.abs(with_eigen).max() + 1e-6
