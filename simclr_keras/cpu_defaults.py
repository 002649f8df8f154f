"""TensorFlow settings that must be chosen before TensorFlow loads: its oneDNN kernels on every x86 CPU.

TensorFlow's Linux x86-64 packages turn their oneDNN kernels on by default only on CPUs with
AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX (`DefaultOneDnnPolicy` in tensorflow/core/util/port.cc).
Everywhere else, the AVX2-only CPUs of most laptops, older cloud machines and AMD EPYCs before Zen 4,
convolutions, matmuls and batch normalisation run on TensorFlow's Eigen kernels instead. There a
ResNet-18 training step took 2.2x as long as with oneDNN's AVX2 kernels, and simclr_keras trained at
half the speed of PyTorch, which uses oneDNN on every CPU (BENCHMARKS.md, issue 18).

`enable_onednn` sets TF_ENABLE_ONEDNN_OPTS=1 when nobody has chosen, so such CPUs get oneDNN too
(CPUs that already had it are unchanged). oneDNN's AVX2 kernels compute the same functions in float32
up to rounding (tests/test_cpu_defaults.py compares them with Eigen's); bfloat16, which AVX2 lacks,
stays on Eigen's kernels (TensorFlow sends bfloat16 ops to oneDNN only on CPUs with AVX-512).
TensorFlow reads the variable once, when it loads: `import simclr_keras` (or any of its modules)
before `import tensorflow`/`import keras` to get it; TF_ENABLE_ONEDNN_OPTS=0 keeps Eigen's kernels.
"""

import os
import platform
import sys

ONEDNN_VARIABLE = "TF_ENABLE_ONEDNN_OPTS"


def enable_onednn(environ=None, system=None, machine=None, tensorflow_loaded=None):
    """Sets TF_ENABLE_ONEDNN_OPTS=1 on x86-64 Linux unless it is set or TensorFlow has loaded already.

    Args:
      environ: mapping to update; default `os.environ`.
      system, machine: `platform.system()` and `platform.machine()` (arguments for the tests).
      tensorflow_loaded: whether TensorFlow is imported (it then ignores the variable); default: looked up.

    Returns:
      True if it set the variable.
    """
    environ = os.environ if environ is None else environ
    system = platform.system() if system is None else system
    machine = platform.machine() if machine is None else machine
    if tensorflow_loaded is None:
        tensorflow_loaded = "tensorflow" in sys.modules
    # Windows x86 packages have oneDNN on already; ARM CPUs get oneDNN's ARM backend only where TensorFlow
    # measured it (Neoverse V1): leave both to TensorFlow.
    if ONEDNN_VARIABLE in environ or tensorflow_loaded or system != "Linux" or machine not in ("x86_64", "AMD64"):
        return False
    environ[ONEDNN_VARIABLE] = "1"
    return True
