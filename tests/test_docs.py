"""The README's Python example runs as written, shrunk to 500 images and one epoch.

The notebooks run as notebooks in tests/test_notebooks.py.
"""

import os
import re

from conftest import REPO_ROOT


def run_shrunk(source, replacements, directory):
    """Applies (old, new) replacements, each of which must occur, then runs the code in `directory`."""
    for old, new in replacements:
        assert old in source, f"the example no longer contains {old!r}: update this test"
        source = source.replace(old, new)
    namespace = {}
    current = os.getcwd()
    os.chdir(directory)
    try:
        exec(compile(source, "example", "exec"), namespace)
    finally:
        os.chdir(current)
    return namespace


def test_readme_python_example_runs(cifar10_500, tmp_path):
    with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as file:
        example = re.search(r"```python\n(.*?)```", file.read(), re.DOTALL).group(1)
    namespace = run_shrunk(
        example,
        [
            ("../shared/datasets/cifar10", cifar10_500),
            ("epochs, steps_per_epoch = 100,", "epochs, steps_per_epoch = 1,"),
            ("512", "64"),
            ("warmup_steps=10 * steps_per_epoch", "warmup_steps=steps_per_epoch"),
        ],
        tmp_path,
    )
    assert len(namespace["model"].history.history["loss"]) == 1
    assert os.path.exists(tmp_path / "encoder.keras")
