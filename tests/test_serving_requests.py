"""The exported signatures under bad and hostile requests, called as a server calls them.

One tiny, untrained SimCLR model is exported with small bounds (max_image_side=64,
max_batch_size=8). Every request of this file is sent in one fresh Python process that imports
only TensorFlow and NumPy and calls `tf.saved_model.load(path).signatures[...]`, as TF Serving
would; the tests read its answers. Expected outputs come from the Keras model the export was made
from, fed pixels made independently (NumPy channel slicing, `tf.io.decode_*`, PIL).
"""

import io
import os
import pickle
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import simclr_keras as sk
from simclr_keras import export

MAX_IMAGE_SIDE = 64
MAX_BATCH_SIZE = 8
TOLERANCE = 1e-5
SAVED_MODEL_CLI = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")


def random_images(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def encoded(image, image_format, mode=None):
    """An image encoded by PIL (GIF, BMP) or TensorFlow (PNG, JPEG)."""
    if image_format == "png":
        return tf.io.encode_png(image).numpy()
    if image_format == "jpeg":
        return tf.io.encode_jpeg(image, quality=90).numpy()
    buffer = io.BytesIO()
    picture = Image.fromarray(image.squeeze())
    (picture.convert(mode) if mode else picture).save(buffer, image_format.upper())
    return buffer.getvalue()


def png_claiming_size(height, width):
    """A PNG whose header claims height x width pixels but whose data holds 2 x 2: decoding it would
    allocate the claimed size (or fail); only the header says how large it is."""
    data = bytearray(encoded(random_images((2, 2, 3)), "png"))
    data[16:24] = struct.pack(">II", width, height)  # IHDR width, height (its CRC is now wrong)
    return bytes(data)


JPEG_IMAGE = random_images((40, 56, 3), seed=1)
PNG_IMAGE = random_images((24, 33, 3), seed=2)
GIF_IMAGE = random_images((20, 30, 3), seed=3)
BMP_IMAGE = random_images((31, 17, 3), seed=4)
ENCODED = [
    encoded(JPEG_IMAGE, "jpeg"), encoded(PNG_IMAGE, "png"), encoded(GIF_IMAGE, "gif", "P"), encoded(BMP_IMAGE, "bmp"),
]  # fmt: skip
MIXED_IMAGES = random_images((2, 40, 50, 3), seed=5)

# name: (signature, inputs). All are sent, in this order, to one fresh process.
REQUESTS = {
    "at_the_bound": ("serving_default", {"images": random_images((2, MAX_IMAGE_SIDE, 20, 3))}),
    "taller_than_the_bound": ("serving_default", {"images": random_images((1, MAX_IMAGE_SIDE + 1, 20, 3))}),
    "wider_than_the_bound": ("serving_default", {"images": random_images((1, 5, 1000, 3))}),
    "batch_beyond_the_bound": ("serving_default", {"images": random_images((MAX_BATCH_SIZE + 1, 4, 4, 3))}),
    "0x0": ("serving_default", {"images": np.zeros((1, 0, 0, 3), np.uint8)}),
    "0x7": ("serving_default", {"images": np.zeros((2, 0, 7, 3), np.uint8)}),
    "rgb": ("serving_default", {"images": MIXED_IMAGES}),
    "rgba": ("serving_default", {"images": np.concatenate([MIXED_IMAGES, random_images((2, 40, 50, 1))], -1)}),
    "grayscale": ("serving_default", {"images": MIXED_IMAGES[..., :1]}),
    "grayscale_alpha": ("serving_default", {"images": MIXED_IMAGES[..., ::-1][..., 1:]}),
    "5_channels": ("serving_default", {"images": random_images((1, 8, 8, 5))}),
    "empty_batch": ("serving_default", {"images": np.zeros((0, 32, 32, 3), np.uint8)}),
    "empty_batch_of_0x0": ("serving_default", {"images": np.zeros((0, 0, 0, 3), np.uint8)}),
    "bytes_empty_batch": ("serving_bytes", {"image_bytes": np.zeros([0], "S1")}),
    "bytes": ("serving_bytes", {"image_bytes": ENCODED}),
    "bytes_jpeg_pixels": ("serving_default", {"images": tf.io.decode_jpeg(ENCODED[0])[None].numpy()}),
    "bytes_garbage": ("serving_bytes", {"image_bytes": [ENCODED[1], b"not an image", ENCODED[0]]}),
    "bytes_truncated": ("serving_bytes", {"image_bytes": [ENCODED[1], ENCODED[0], ENCODED[0][:300]]}),
    "bytes_empty_item": ("serving_bytes", {"image_bytes": [b"", ENCODED[1]]}),
    "bytes_huge_header": ("serving_bytes", {"image_bytes": [ENCODED[1], png_claiming_size(60000, 50000)]}),
    "bytes_jpeg_beyond": ("serving_bytes", {"image_bytes": [encoded(random_images((8, 65, 3)), "jpeg")]}),
    "bytes_gif_beyond": ("serving_bytes", {"image_bytes": [encoded(random_images((70, 3, 3)), "gif", "P")]}),
    "bytes_batch_beyond": ("serving_bytes", {"image_bytes": [ENCODED[1]] * (MAX_BATCH_SIZE + 1)}),
}

SERVER = textwrap.dedent(
    """
    import pickle
    import sys

    import numpy as np
    import tensorflow as tf

    version_dir, requests_path, answers_path = sys.argv[1:]
    loaded = tf.saved_model.load(version_dir)
    with open(requests_path, "rb") as file:
        requests = pickle.load(file)
    answers = {}
    for name, (signature, inputs) in requests.items():
        try:
            outputs = loaded.signatures[signature](**{key: tf.constant(value) for key, value in inputs.items()})
            answers[name] = {key: value.numpy() for key, value in outputs.items()}
        except (tf.errors.OpError, KeyError) as error:
            answers[name] = f"{type(error).__name__}: {error}"
    answers["simclr_keras modules"] = sorted(name for name in sys.modules if name.startswith("simclr_keras"))
    with open(answers_path, "wb") as file:
        pickle.dump(answers, file)
    """
)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The tiny model, its export, and the fresh process's answers to REQUESTS."""
    model = sk.build_simclr(width_multiplier=0.125, image_size=16, proj_dim=16)
    model.encoder(model.augmenter(np.zeros((1, 16, 16, 3), np.uint8), training=False))  # builds the weights
    root = tmp_path_factory.mktemp("served")
    version_dir = export.export_encoder(
        model, str(root / "export"), max_image_side=MAX_IMAGE_SIDE, max_batch_size=MAX_BATCH_SIZE
    )
    with open(root / "requests.pickle", "wb") as file:
        pickle.dump(REQUESTS, file)
    result = subprocess.run(
        [sys.executable, "-c", SERVER, version_dir, str(root / "requests.pickle"), str(root / "answers.pickle")],
        capture_output=True, text=True, timeout=300, cwd=root,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with open(root / "answers.pickle", "rb") as file:
        answers = pickle.load(file)
    assert answers.pop("simclr_keras modules") == []
    return {"model": model, "version_dir": version_dir, "answers": answers}


def keras_embeddings(model, images):
    """The embeddings the signatures must give: the Keras model's evaluation path on RGB uint8 pixels."""
    return model.encoder(model.augmenter(images, training=False), training=False).numpy()


def assert_embeddings(answer, expected):
    assert isinstance(answer, dict), answer[:2000]
    assert answer["embeddings"].dtype == np.float32 and answer["embeddings"].shape == expected.shape
    np.testing.assert_allclose(answer["embeddings"], expected, rtol=0, atol=TOLERANCE)
    assert np.abs(expected).max() > 0.01  # an all-zero representation would match trivially


def refusal(answer):
    """The assertion message of a refused request (TensorFlow adds node names on other lines)."""
    assert isinstance(answer, str), "the request was answered, not refused"
    assert answer.startswith("InvalidArgumentError"), answer[:2000]
    [line] = [line for line in answer.splitlines() if "assertion failed: [" in line]
    return line.split("assertion failed: [", 1)[1].rsplit("]", 1)[0]


def test_images_beyond_the_max_side_or_batch_size_are_refused_naming_bound_and_size(served):
    answers = served["answers"]
    assert refusal(answers["taller_than_the_bound"]) == (
        "images: 65x20 pixels (height x width); this export takes sides of 1 to 64 pixels (its max_image_side)"
    )
    assert refusal(answers["wider_than_the_bound"]).startswith("images: 5x1000 pixels (height x width);")
    assert refusal(answers["batch_beyond_the_bound"]) == (
        "images: a batch of 9 images; this export takes 0 to 8 images a request (its max_batch_size)"
    )
    images = REQUESTS["at_the_bound"][1]["images"]
    assert_embeddings(answers["at_the_bound"], keras_embeddings(served["model"], images))


def test_an_image_without_pixels_is_refused_naming_its_size(served):
    assert refusal(served["answers"]["0x0"]).startswith("images: 0x0 pixels (height x width); this export takes sides")
    assert refusal(served["answers"]["0x7"]).startswith("images: 0x7 pixels")


def test_grayscale_and_alpha_are_converted_to_rgb_as_training_decodes_them(served):
    answers, model = served["answers"], served["model"]
    expected = keras_embeddings(model, MIXED_IMAGES)
    assert_embeddings(answers["rgb"], expected)
    assert_embeddings(answers["rgba"], expected)  # alpha dropped
    # Grayscale replicated to three channels, as tf.io.decode_image(..., channels=3) does.
    gray = REQUESTS["grayscale"][1]["images"]
    assert_embeddings(answers["grayscale"], keras_embeddings(model, np.repeat(gray, 3, axis=-1)))
    gray_alpha = REQUESTS["grayscale_alpha"][1]["images"]
    assert_embeddings(answers["grayscale_alpha"], keras_embeddings(model, np.repeat(gray_alpha[..., :1], 3, axis=-1)))
    assert refusal(answers["5_channels"]) == (
        "images: 5 channels; this export takes 3 (RGB), 1 (grayscale), 2 (grayscale and alpha) "
        "or 4 (RGBA; alpha is dropped)"
    )


def test_an_empty_batch_gets_empty_outputs(served):
    embedding_dim = served["model"].encoder.output.shape[-1]
    for name in ("empty_batch", "empty_batch_of_0x0", "bytes_empty_batch"):
        answer = served["answers"][name]
        assert isinstance(answer, dict), f"{name}: {answer[:2000]}"
        shapes = {key: (value.dtype, value.shape) for key, value in answer.items()}
        assert shapes == {"embeddings": (np.float32, (0, embedding_dim)), "projections": (np.float32, (0, 16))}, name


def test_serving_bytes_gives_serving_defaults_embeddings_of_the_decoded_pixels(served):
    answers, model = served["answers"], served["model"]
    answer = answers["bytes"]
    assert isinstance(answer, dict), answer[:2000]
    # JPEG is lossy: the reference is serving_default on TensorFlow's decoded pixels (libjpeg).
    assert_embeddings({"embeddings": answer["embeddings"][:1]}, answers["bytes_jpeg_pixels"]["embeddings"])
    # PNG and BMP are lossless, GIF too once the palette is applied (PIL's, read back by PIL).
    gif_pixels = np.asarray(Image.open(io.BytesIO(ENCODED[2])).convert("RGB"))
    for row, pixels in [(1, PNG_IMAGE), (2, gif_pixels), (3, BMP_IMAGE)]:
        assert_embeddings({"embeddings": answer["embeddings"][row : row + 1]}, keras_embeddings(model, pixels[None]))
    assert answer["projections"].shape == (4, 16)


def test_serving_bytes_refuses_undecodable_items_by_index(served):
    answers = served["answers"]
    assert refusal(answers["bytes_garbage"]) == (
        "image_bytes[1]: 12 bytes that do not decode as a JPEG, PNG, GIF or BMP image; send one encoded image per item"
    )
    assert refusal(answers["bytes_truncated"]).startswith("image_bytes[2]: 300 bytes that do not decode")
    assert refusal(answers["bytes_empty_item"]).startswith("image_bytes[0]: 0 bytes that do not decode")


def test_serving_bytes_refuses_images_beyond_the_bounds_from_their_headers(served):
    answers = served["answers"]
    # Refused by its header's size, not as undecodable: it was never decoded.
    assert refusal(answers["bytes_huge_header"]).endswith(
        "image_bytes[1]: 60000x50000 pixels (height x width); "
        "this export takes sides of 1 to 64 pixels (its max_image_side)"
    )
    assert "image_bytes[0]: 8x65 pixels" in refusal(answers["bytes_jpeg_beyond"])
    assert "image_bytes[0]: 70x3 pixels" in refusal(answers["bytes_gif_beyond"])
    assert refusal(answers["bytes_batch_beyond"]) == (
        "image_bytes: a batch of 9 images; this export takes 0 to 8 images a request (its max_batch_size)"
    )


@pytest.mark.parametrize(
    "signature, name, inputs",
    [("serving_default", "images", MIXED_IMAGES), ("serving_bytes", "image_bytes", np.array(ENCODED[1:2]))],
)
def test_saved_model_cli_run_answers_on_both_signatures(served, tmp_path, signature, name, inputs):
    np.save(tmp_path / "inputs.npy", inputs)  # encoded images as a NumPy bytes array ("S")
    result = subprocess.run(
        [
            SAVED_MODEL_CLI, "run", "--dir", served["version_dir"], "--tag_set", "serve", "--signature_def", signature,
            "--inputs", f"{name}={tmp_path / 'inputs.npy'}", "--outdir", str(tmp_path / "outputs"),
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    pixels = inputs if signature == "serving_default" else PNG_IMAGE[None]
    answer = {"embeddings": np.load(tmp_path / "outputs" / "embeddings.npy")}
    assert_embeddings(answer, keras_embeddings(served["model"], pixels))


def test_export_bounds_must_be_positive_integers(served, tmp_path):
    for settings in ({"max_image_side": 0}, {"max_batch_size": 2.5}):
        [(name, value)] = settings.items()
        with pytest.raises(ValueError, match=rf"^{name} must be a positive integer. Received: {name}={value}$"):
            export.export_encoder(served["model"], str(tmp_path), **settings)
    assert not os.listdir(tmp_path)  # refused before anything is written


@pytest.mark.parametrize("strip_floats", [1, 500, 1 << 22], ids=["row_by_row", "several_rows", "one_strip"])
def test_the_strips_of_rows_add_up_to_the_augmenters_evaluation_view(served, monkeypatch, strip_floats):
    from simclr_keras.export import serving_inputs

    monkeypatch.setattr(serving_inputs, "STRIP_FLOATS", strip_floats)
    augmenter = sk.SimCLRAugmentation(24, eval_crop_fraction=0.875)  # a crop smaller than the image
    images = random_images((2, 37, 53, 3), seed=6)
    np.testing.assert_allclose(
        serving_inputs.evaluation_views(tf.constant(images), augmenter).numpy(),
        augmenter(images, training=False).numpy(), rtol=0, atol=1e-6,
    )  # fmt: skip
