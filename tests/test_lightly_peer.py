"""The lightly peer of benchmarks/accuracy_vs_lightly.py: what makes its comparison an equal one.

The architecture is ours (the same weight shapes as simclr_keras.backbones' ResNet-18 at the same
width), the kNN applied to both encoders predicts what lightly's own `knn_predict` predicts, and the
peer's features see the images as lightly's benchmark preprocesses its test set.

torch, torchvision and lightly are an optional extra (`pip install -e ".[bench]"`): without them
this module is skipped. Their side runs in a subprocess: importing torchvision into a process that
has loaded TensorFlow (conftest.py does) crashes it, as the benchmark's own processes avoid too.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from simclr_keras import backbones, evaluation

# Slow: the torch side starts in a subprocess (~30 s); torch is the optional bench extra.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        any(importlib.util.find_spec(name) is None for name in ("torch", "torchvision", "lightly")),
        reason="torch, torchvision and lightly (the bench extra) are not installed",
    ),
]

BENCHMARKS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
WIDTHS = (0.25, 0.5)
K_VALUES = (1, 10, 120)

# The torch side: reads the inputs (.npz), prints what the tests compare as one JSON object.
TORCH_SIDE = """
import json, sys
import numpy as np, torch
from PIL import Image
from lightly.transforms.utils import IMAGENET_NORMALIZE
from lightly.utils.benchmarking import knn_predict
from torchvision import transforms
sys.path.insert(0, sys.argv[2])
import lightly_peer

inputs = np.load(sys.argv[1])
result = {}
for width in %(widths)r:
    backbone = lightly_peer.build_backbone(width)
    result[f"shapes_{width}"] = [list(parameter.shape) for parameter in backbone.parameters()]
    result[f"h_dim_{width}"] = backbone(torch.zeros(2, 3, 32, 32)).flatten(start_dim=1).shape[1]
    result[f"declared_h_dim_{width}"] = lightly_peer.backbone_output_dim(width)
bank = torch.nn.functional.normalize(torch.from_numpy(inputs["train_features"]), dim=1).t()  # [D, N]
query = torch.nn.functional.normalize(torch.from_numpy(inputs["test_features"]), dim=1)
labels = torch.from_numpy(inputs["train_labels"])
for k in %(k_values)r:
    result[f"ranked_{k}"] = knn_predict(query, bank, labels, 6, knn_k=k, knn_t=0.1).tolist()
test_transform = transforms.Compose(
    [transforms.ToTensor(), transforms.Normalize(IMAGENET_NORMALIZE["mean"], IMAGENET_NORMALIZE["std"])]
)
result["transformed"] = [test_transform(Image.fromarray(image)).reshape(-1).tolist() for image in inputs["images"]]
result["encoded"] = lightly_peer.encode(torch.nn.Identity(), inputs["images"]).tolist()  # pixels as the peer sees them
print(json.dumps(result))
""" % {"widths": WIDTHS, "k_values": K_VALUES}


@pytest.fixture(scope="module")
def inputs():
    random = np.random.default_rng(0)
    return {
        "train_features": random.normal(size=(120, 8)).astype(np.float32),
        "train_labels": random.integers(0, 6, size=120),
        "test_features": random.normal(size=(40, 8)).astype(np.float32),
        "images": random.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8),
    }


@pytest.fixture(scope="module")
def torch_side(inputs, tmp_path_factory):
    path = tmp_path_factory.mktemp("lightly_peer") / "inputs.npz"
    np.savez(path, **inputs)
    result = subprocess.run(
        [sys.executable, "-c", TORCH_SIDE, str(path), BENCHMARKS_DIR], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def keras_layout(shape):
    """A torch weight shape in Keras' layout: convolutions [out, in, kh, kw] -> [kh, kw, in, out]."""
    return (shape[2], shape[3], shape[1], shape[0]) if len(shape) == 4 else tuple(shape)


@pytest.mark.parametrize("width_multiplier", WIDTHS)
def test_peer_backbone_has_the_weights_of_our_resnet18(torch_side, width_multiplier):
    ours = backbones.resnet(18, width_multiplier, image_size=32)
    peer_shapes = sorted(keras_layout(shape) for shape in torch_side[f"shapes_{width_multiplier}"])
    assert peer_shapes == sorted(tuple(weight.shape) for weight in ours.trainable_weights)
    # h has the same width: what the kNN compares.
    assert torch_side[f"h_dim_{width_multiplier}"] == torch_side[f"declared_h_dim_{width_multiplier}"]
    assert torch_side[f"h_dim_{width_multiplier}"] == ours.output_shape[-1]


@pytest.mark.parametrize("k", K_VALUES)
def test_our_knn_predicts_what_lightlys_knn_predict_predicts(torch_side, inputs, k):
    predictions, scores = evaluation.knn_classify(
        inputs["train_features"], inputs["train_labels"], inputs["test_features"], k, 0.1, 6
    )
    ranked = np.asarray(torch_side[f"ranked_{k}"])  # classes by lightly's votes, best first
    np.testing.assert_array_equal(predictions, ranked[:, 0])
    # The rankings agree over the classes that got votes (the others tie at zero).
    for row_scores, row_ranked in zip(scores, ranked):
        voted = int(np.sum(row_scores > 0))
        np.testing.assert_array_equal(np.argsort(-row_scores, kind="stable")[:voted], row_ranked[:voted])


def test_peer_features_see_images_as_lightlys_test_transform(torch_side):
    np.testing.assert_allclose(torch_side["encoded"], torch_side["transformed"], rtol=1e-6, atol=1e-6)
