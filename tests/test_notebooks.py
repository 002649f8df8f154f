"""The notebooks run top to bottom as notebooks (a Jupyter kernel through nbclient), on 500 images.

Each notebook's first code cell is tagged "parameters" (the papermill convention) and holds every
path and size. A test injects a cell right after it that assigns smaller values, as papermill does,
so the notebook's own defaults stay as a user sees them. Committed notebooks carry no outputs.
"""

import ast
import base64
import os
import time

import nbformat
import numpy as np
import pytest
import tensorflow as tf
from nbclient import NotebookClient

from conftest import REPO_ROOT

NOTEBOOKS_DIR = os.path.join(REPO_ROOT, "notebooks")
NOTEBOOKS = ("quickstart.ipynb", "linear_probe.ipynb")


def parameters_cell_index(notebook):
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert "parameters" in cell.metadata.get("tags", []), "the first code cell must be tagged 'parameters'"
            return index
    raise AssertionError("the notebook has no code cell")


def assigned_names(source):
    """Names assigned at the top level of `source` (tuple assignments included)."""
    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                names.update(name.id for name in ast.walk(target) if isinstance(name, ast.Name))
    return names


def run_notebook(name, directory, **parameters):
    """Executes notebooks/NAME in `directory` with `parameters` injected; returns (notebook, seconds)."""
    notebook = nbformat.read(os.path.join(NOTEBOOKS_DIR, name), as_version=4)
    index = parameters_cell_index(notebook)
    unknown = set(parameters) - assigned_names(notebook.cells[index].source)
    assert not unknown, f"{name}'s parameters cell no longer defines {sorted(unknown)}: update this test"
    injected = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(injected, metadata={"tags": ["injected-parameters"]}))
    started = time.time()
    # An error in any cell raises CellExecutionError with that cell's traceback.
    NotebookClient(
        notebook, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(directory)}}
    ).execute()
    return notebook, time.time() - started


def stream_text(notebook):
    return "".join(
        output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", [])
        if output.output_type == "stream"
    )  # fmt: skip


def displayed_pngs(notebook):
    """The decoded PNG images the notebook displayed, uint8 [H, W, C] each."""
    images = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if "image/png" in output.get("data", {}):
                images.append(tf.io.decode_png(base64.b64decode(output["data"]["image/png"])).numpy())
    return images


def assert_pictures(images, count):
    assert len(images) == count
    for image in images:
        assert image.shape[0] > 200 and image.shape[1] > 300
        assert np.std(image[..., :3]) > 0  # not blank


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_no_outputs_and_a_parameters_cell(name):
    notebook = nbformat.read(os.path.join(NOTEBOOKS_DIR, name), as_version=4)
    nbformat.validate(notebook)
    parameters = notebook.cells[parameters_cell_index(notebook)].source
    assert {"DATA", "EXPORT_DIR"} <= assigned_names(parameters)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name} was committed with outputs"


@pytest.mark.slow
def test_quickstart_notebook_runs(cifar10_500, tmp_path):
    notebook, seconds = run_notebook(
        "quickstart.ipynb",
        tmp_path,
        DATA=f"folder:{cifar10_500}",
        BATCH_SIZE=64,
        EPOCHS=1,
        WIDTH=0.125,
        MAX_TRAIN_EXAMPLES=256,
        OUTPUT_DIR=str(tmp_path / "quickstart"),
        EXPORT_DIR=str(tmp_path / "export"),
    )
    print(f"quickstart.ipynb ran in {seconds:.1f} s")
    text = stream_text(notebook)
    assert "256 training images, 100 test images, 10 classes, 4 steps per epoch" in text
    assert "online linear probe on 100 test images: top-1 accuracy" in text
    # The pairs of views, then the training curves.
    assert_pictures(displayed_pngs(notebook), 2)
    with open(tmp_path / "quickstart" / "train_log.jsonl", encoding="utf-8") as file:
        assert len(file.readlines()) == 4
    assert os.path.isfile(tmp_path / "quickstart" / "simclr_encoder.keras")
    assert os.path.isfile(tmp_path / "export" / "1" / "saved_model.pb")


@pytest.mark.slow
def test_linear_probe_notebook_pretrains_exports_and_measures(cifar10_500, tmp_path):
    notebook, seconds = run_notebook(
        "linear_probe.ipynb",
        tmp_path,
        DATA=f"folder:{cifar10_500}",
        EXPORT_DIR=None,  # no export yet: the notebook pretrains and exports one itself
        LINEAR_EPOCHS=2,
        QUICK_STEPS=2,
        QUICK_BATCH_SIZE=64,
        QUICK_WIDTH=0.125,
    )
    print(f"linear_probe.ipynb ran in {seconds:.1f} s")
    text = stream_text(notebook)
    assert "pretraining a small encoder for 2 steps first" in text
    assert "train features (500, 64), test features (100, 64), 10 classes" in text
    assert "kNN (k=200, T=0.1): top-1 " in text
    assert "linear (2 epochs, batch 500): top-1 " in text
    # The confusion matrix, then the PCA scatter plot.
    assert_pictures(displayed_pngs(notebook), 2)
