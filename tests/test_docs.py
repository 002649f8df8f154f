"""The README's Python examples run as written, shrunk to 500 images and a few steps.

The notebooks run as notebooks in tests/test_notebooks.py; the examples of docs/serving.md run in
tests/test_export.py and tests/test_official.py.
"""

import json
import os
import re

import keras
import numpy as np
import pytest
from conftest import REPO_ROOT


def readme_python_block(containing):
    with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as file:
        blocks = [block for block in re.findall(r"```python\n(.*?)```", file.read(), re.DOTALL) if containing in block]
    assert len(blocks) == 1, f"expected one ```python block of the README with {containing!r}: update this test"
    return blocks[0]


def run_shrunk(source, replacements, directory, **names):
    """Applies (old, new) replacements, each of which must occur, then runs the code in `directory`.

    `names` are visible to the code; returns its namespace."""
    for old, new in replacements:
        assert old in source, f"the example no longer contains {old!r}: update this test"
        source = source.replace(old, new)
    namespace = dict(names)
    current = os.getcwd()
    os.chdir(directory)
    try:
        exec(compile(source, "example", "exec"), namespace)
    finally:
        os.chdir(current)
    return namespace


def read_log(path):
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file]


@pytest.mark.slow  # ~13 s; the fast tier trains through pretrain in tests/test_train_cli.py
def test_readme_pretrain_example_trains_then_resumes(cifar10_500, tmp_path):
    namespace = run_shrunk(
        readme_python_block("sk.pretrain("),
        [
            ('dataset="cifar10"', f'dataset="folder:{cifar10_500}"'),
            ("train_steps=100", "train_steps=2"),
            ("batch_size=256, width_multiplier=0.25", "batch_size=64, width_multiplier=0.125"),
            # What the first call logged, to compare with the log after the second call.
            (
                "result = sk.pretrain(config.replace(",
                "first_log = read_log('runs/api/train_log.jsonl')\nresult = sk.pretrain(config.replace(",
            ),
            ("train_steps=200", "train_steps=4"),
        ],
        tmp_path,
        read_log=read_log,
    )
    result, first_log = namespace["result"], namespace["first_log"]
    assert (result.final_step, result.stop_reason) == (4, "finished")
    log = read_log(tmp_path / "runs" / "api" / "train_log.jsonl")
    # Resumed, not restarted: the first call's records stay as they were, and the global step goes on.
    assert [record["step"] for record in first_log] == [1, 2]
    assert log[:2] == first_log and [record["step"] for record in log] == [1, 2, 3, 4]
    knn = namespace["knn"]
    assert (knn.num_train, knn.num_test, knn.num_classes) == (500, 100, 10)
    # The reported top-1 is that of the scores it returns (the kNN votes), against the test labels.
    assert knn.top1 == np.mean(np.argmax(knn.scores, axis=1) == knn.test_labels)


def test_readme_fit_example_runs(cifar10_500, tmp_path):
    namespace = run_shrunk(
        readme_python_block("model.fit("),
        [
            ('load_images("cifar10"', f'load_images("folder:{cifar10_500}"'),
            ("epochs, steps_per_epoch = 100,", "epochs, steps_per_epoch = 1,"),
            ("512", "64"),
            ("warmup_steps=10 * steps_per_epoch", "warmup_steps=steps_per_epoch"),
            ("sk.resnet(depth=18, image_size=32)", "sk.resnet(depth=18, image_size=32, width_multiplier=0.125)"),
        ],
        tmp_path,
    )
    model = namespace["model"]
    assert len(model.history.history["loss"]) == 1
    assert int(model.optimizer.iterations) == 500 // 64  # one epoch of full batches
    # The saved encoder is the trained one: same outputs, in a model loaded back from the file.
    loaded = keras.models.load_model(tmp_path / "encoder.keras")
    images = np.random.default_rng(0).uniform(size=(4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(loaded(images), model.encoder(images, training=False), rtol=1e-5, atol=1e-6)
