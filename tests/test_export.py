"""Export for TF Serving and loading back, on a run trained for one step on 500 real CIFAR-10 images.

The SavedModel is checked the ways its users meet it: `saved_model_cli show` and `run`, a fresh
Python process that imports only TensorFlow and NumPy, the README's gRPC client and REST body
against a stand-in for TF Serving, and `load_encoder` inside `keras.Sequential` for transfer
learning. Every output is compared with the Keras model it came from. The command line
`python -m simclr_keras.export` runs once in a subprocess; its errors run `main` in this process.
"""

import base64
import concurrent.futures
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags as absl_flags
from conftest import REPO_ROOT, run_train_main

import simclr_keras as sk
from simclr_keras import export, runs
from simclr_keras.export import __main__ as export_command
from simclr_keras.export import serving_inputs

PROJECTION_DIM = 16
TINY_RUN = [
    "--train_steps=1",
    "--batch_size=64",
    "--width_multiplier=0.125",
    "--image_size=16",  # CIFAR's 32 px images are then resized inside the served graph
    f"--proj_dim={PROJECTION_DIM}",
    "--eval_split=",
]
SAVED_MODEL_CLI = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
# Bounds given to the export command (version 2); training's export (version 1) has the defaults.
COMMAND_BOUNDS = ["--max_image_side=48", "--max_batch_size=16"]
# Tolerance of the issue; the graphs are the same, so the outputs agree far more closely in practice.
TOLERANCE = 1e-5


def run_module(module, *flags):
    return subprocess.run(
        [sys.executable, "-m", module, *flags], capture_output=True, text=True, timeout=300
    )


def file_digest(path):
    with open(path, "rb") as file:
        return hashlib.sha256(file.read()).hexdigest()


@pytest.fixture(scope="module")
def exported(cifar10_500, tmp_path_factory):
    """A run exported twice: version 1 by training with --export_dir, version 2 by the export command."""
    model_dir = str(tmp_path_factory.mktemp("run"))
    export_dir = os.path.join(str(tmp_path_factory.mktemp("exports")), "simclr")
    status, trained_stdout, trained_stderr = run_train_main(
        f"--dataset=folder:{cifar10_500}", f"--model_dir={model_dir}", f"--export_dir={export_dir}", *TINY_RUN
    )
    assert status == 0, trained_stderr[-3000:]
    first_digest = file_digest(os.path.join(export_dir, "1", "saved_model.pb"))
    exported_again = run_module(
        "simclr_keras.export", f"--model_dir={model_dir}", f"--export_dir={export_dir}", *COMMAND_BOUNDS
    )
    assert exported_again.returncode == 0, exported_again.stderr[-3000:]

    test_paths = sorted(glob.glob(os.path.join(cifar10_500, "test", "*", "*.jpg")))[::10][:6]
    images = np.stack([tf.io.decode_jpeg(tf.io.read_file(path)).numpy() for path in test_paths])  # (6, 32, 32, 3)
    return {
        "model_dir": model_dir,
        "export_dir": export_dir,
        "outputs": (trained_stdout, exported_again.stdout),
        "first_digest": first_digest,
        "model": runs.load_model(model_dir),
        "images": images,
    }


def keras_outputs(model, images):
    """What the signature must return: the Keras model's evaluation path."""
    embeddings = model.encoder(model.augmenter(images, training=False), training=False)
    return {
        "embeddings": embeddings.numpy(),
        "projections": model.projection_head(embeddings, training=False).numpy(),
    }


def assert_outputs_match(outputs, expected):
    assert set(outputs) == {"embeddings", "projections"}
    for name, value in expected.items():
        assert outputs[name].dtype == np.float32 and outputs[name].shape == value.shape, name
        np.testing.assert_allclose(outputs[name], value, rtol=0, atol=TOLERANCE, err_msg=name)
    # An all-zero representation would match trivially.
    assert np.abs(expected["embeddings"]).max() > 0.01


def test_training_and_the_command_write_versions_1_and_2_without_overwriting(exported):
    export_dir = exported["export_dir"]
    assert sorted(os.listdir(export_dir)) == ["1", "2"]  # no staging folder left behind
    for version in ("1", "2"):
        assert {"assets.extra", "saved_model.pb", "variables"} <= set(os.listdir(os.path.join(export_dir, version)))
    assert file_digest(os.path.join(export_dir, "1", "saved_model.pb")) == exported["first_digest"]
    assert f"exported the encoder to {os.path.join(export_dir, '1')}" in exported["outputs"][0]
    assert os.path.join(export_dir, "2") in exported["outputs"][1]


def test_the_bounds_are_the_commands_flags_or_the_defaults(exported):
    export_dir = exported["export_dir"]
    for version, bounds in [("1", (4096, 1024)), ("2", (48, 16))]:  # 2: COMMAND_BOUNDS
        with open(os.path.join(export_dir, version, export.METADATA_PATH), encoding="utf-8") as file:
            metadata = json.load(file)
        assert (metadata["max_image_side"], metadata["max_batch_size"]) == bounds, version
    serve = tf.saved_model.load(os.path.join(export_dir, "2")).signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="images: 49x48 pixels .* sides of 1 to 48 pixels"):
        serve(images=tf.zeros([1, 49, 48, 3], tf.uint8))
    # The command writes the defaults again (defining its flags must not import TensorFlow): the same numbers.
    flag_values = absl_flags.FlagValues()
    export_command.define_flags(flag_values)
    assert (flag_values["max_image_side"].default, flag_values["max_batch_size"].default) == (
        serving_inputs.DEFAULT_MAX_IMAGE_SIDE, serving_inputs.DEFAULT_MAX_BATCH_SIZE,
    )  # fmt: skip


def test_the_next_version_is_one_above_the_highest_and_never_reuses_a_folder(exported, tmp_path):
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "keep.txt").write_text("an older version")
    (tmp_path / "notes").mkdir()  # not a version: TF Serving ignores it, and so does the numbering
    version_dir = export.export_encoder(exported["model"], str(tmp_path))
    assert version_dir == str(tmp_path / "8")
    assert os.listdir(tmp_path / "7") == ["keep.txt"]
    assert export.export_versions(str(tmp_path)) == [7, 8]


def test_saved_model_cli_shows_both_signatures(exported):
    result = subprocess.run(
        [SAVED_MODEL_CLI, "show", "--dir", os.path.join(exported["export_dir"], "2"), "--all"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    def tensors(signature_name):
        signature = result.stdout.split(f"signature_def['{signature_name}']:")[1].split("signature_def[")[0]
        return {
            (kind, name): (dtype, shape)
            for kind, name, dtype, shape in re.findall(
                r"(inputs|outputs)\['(\w+)'\] tensor_info:\s+dtype: (\w+)\s+shape: \(([^)]*)\)", signature
            )
        }

    embedding_dim = exported["model"].encoder.output.shape[-1]
    outputs = {
        ("outputs", "embeddings"): ("DT_FLOAT", f"-1, {embedding_dim}"),
        ("outputs", "projections"): ("DT_FLOAT", f"-1, {PROJECTION_DIM}"),
    }
    # Any number of channels: the graph converts 1, 2 and 4 to RGB and refuses the others.
    assert tensors("serving_default") == {("inputs", "images"): ("DT_UINT8", "-1, -1, -1, -1"), **outputs}
    assert tensors("serving_bytes") == {("inputs", "image_bytes"): ("DT_STRING", "-1"), **outputs}


def test_saved_model_cli_run_gives_the_keras_models_outputs(exported, tmp_path):
    np.save(tmp_path / "images.npy", exported["images"])
    result = subprocess.run(
        [
            SAVED_MODEL_CLI, "run", "--dir", os.path.join(exported["export_dir"], "1"), "--tag_set", "serve",
            "--signature_def", "serving_default", "--inputs", f"images={tmp_path / 'images.npy'}",
            "--outdir", str(tmp_path / "outputs"),
        ],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = {name: np.load(tmp_path / "outputs" / f"{name}.npy") for name in ("embeddings", "projections")}
    assert_outputs_match(outputs, keras_outputs(exported["model"], exported["images"]))


FRESH_PROCESS = textwrap.dedent(
    """
    import sys

    import numpy as np
    import tensorflow as tf

    version_dir, inputs_path, outputs_path = sys.argv[1:]
    serve = tf.saved_model.load(version_dir).signatures["serving_default"]
    results = {}
    with np.load(inputs_path) as inputs:
        for size in inputs.files:
            for name, value in serve(images=tf.constant(inputs[size])).items():
                results[f"{size}.{name}"] = value.numpy()
    np.savez(outputs_path, **results)
    print("simclr_keras modules:", sorted(name for name in sys.modules if name.startswith("simclr_keras")))
    """
)


def test_a_process_without_simclr_keras_serves_images_of_any_size(exported, tmp_path):
    images = exported["images"]
    inputs = {
        "training_size": images,
        # Not square and not the training size: cropped and resized inside the graph.
        "24x40": tf.cast(tf.round(tf.image.resize(images, (24, 40))), tf.uint8).numpy(),
    }
    np.savez(tmp_path / "inputs.npz", **inputs)
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, os.path.join(exported["export_dir"], "2"),
         str(tmp_path / "inputs.npz"), str(tmp_path / "outputs.npz")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "simclr_keras modules: []" in result.stdout
    with np.load(tmp_path / "outputs.npz") as outputs:
        for size, sized_images in inputs.items():
            assert_outputs_match(
                {name: outputs[f"{size}.{name}"] for name in ("embeddings", "projections")},
                keras_outputs(exported["model"], sized_images),
            )


def serving_docs():
    """The "Serving and reusing the encoder" section of docs/serving.md (moved there from the README)."""
    with open(os.path.join(REPO_ROOT, "docs", "serving.md"), encoding="utf-8") as file:
        readme = file.read()
    start = readme.index("## Serving and reusing the encoder")
    return readme[start : readme.index("\n## ", start + 1)]


def code_block(language, containing):
    blocks = re.findall(rf"```{language}\n(.*?)```", serving_docs(), re.DOTALL)
    blocks = [block for block in blocks if containing in block]
    assert len(blocks) == 1, f"expected one ```{language} block with {containing!r} in the Serving docs"
    return blocks[0]


def served_model_name():
    return re.search(r"MODEL_NAME=(\w+)", code_block("bash", "docker run")).group(1)


def run_docs_grpc_client(exported, containing, replacements, namespace):
    """Runs the docs' gRPC client holding `containing` against a stand-in for TF Serving; its namespace."""
    try:
        import grpc
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
    except ImportError:
        # Not a skip: the documented client would go untested. The `test` extra installs it.
        pytest.fail('tensorflow-serving-api is missing: pip install -e ".[test]" (or ".[serving]")')

    signatures = tf.saved_model.load(os.path.join(exported["export_dir"], "2")).signatures
    model_name = served_model_name()

    class StandInForTFServing(prediction_service_pb2_grpc.PredictionServiceServicer):
        """Answers Predict for one model as TF Serving does, rejecting requests its signatures would."""

        def Predict(self, request, context):
            if request.model_spec.name != model_name:
                context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.model_spec.name!r}")
            signature = signatures.get(request.model_spec.signature_name or "serving_default")
            input_specs = signature.structured_input_signature[1] if signature else {}  # {name: TensorSpec}
            if signature is None or set(request.inputs) != set(input_specs):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad signature or inputs {list(request.inputs)}")
            for name, spec in input_specs.items():
                if request.inputs[name].dtype != spec.dtype.as_datatype_enum:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{name}: dtype {request.inputs[name].dtype}")
            outputs = signature(**{name: tf.make_ndarray(tensor) for name, tensor in request.inputs.items()})
            response = predict_pb2.PredictResponse()
            response.model_spec.CopyFrom(request.model_spec)
            for name, value in outputs.items():
                response.outputs[name].CopyFrom(tf.make_tensor_proto(value.numpy()))
            return response

    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=1))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(StandInForTFServing(), server)
    port = server.add_insecure_port("localhost:0")
    server.start()
    client = code_block("python", containing)
    for old, new in [*replacements, ("localhost:8500", f"localhost:{port}")]:
        assert old in client, f"the gRPC client no longer contains {old!r}: update this test"
        client = client.replace(old, new)
    try:
        exec(compile(client, "grpc_client", "exec"), namespace)
    finally:
        server.stop(grace=None)
    return namespace


def test_the_docs_grpc_client_gets_the_keras_models_outputs(exported):
    namespace = run_docs_grpc_client(
        exported, '"serving_default"', [("images = np.zeros((2, 96, 128, 3), np.uint8)", "images = test_images")],
        {"test_images": exported["images"]},
    )  # fmt: skip
    assert_outputs_match(
        {name: namespace[name] for name in ("embeddings", "projections")},
        keras_outputs(exported["model"], exported["images"]),
    )


def test_the_docs_serving_bytes_client_gets_the_embeddings_of_the_decoded_files(exported, tmp_path):
    jpeg_path, png_path = tmp_path / "cat.jpg", tmp_path / "dog.png"
    jpeg_path.write_bytes(tf.io.encode_jpeg(exported["images"][0]).numpy())
    png_path.write_bytes(tf.io.encode_png(exported["images"][1, :20]).numpy())  # another size, lossless
    namespace = run_docs_grpc_client(
        exported, '"serving_bytes"', [('["cat.jpg", "dog.png"]', repr([str(jpeg_path), str(png_path)]))], {}
    )
    decoded_jpeg = tf.io.decode_jpeg(jpeg_path.read_bytes()).numpy()  # JPEG is lossy: TensorFlow's pixels
    for row, pixels in enumerate([decoded_jpeg, exported["images"][1, :20]]):
        np.testing.assert_allclose(
            namespace["embeddings"][row], keras_outputs(exported["model"], pixels[None])["embeddings"][0],
            rtol=0, atol=TOLERANCE,
        )  # fmt: skip


def test_the_docs_rest_body_fits_the_signature(exported):
    body = json.loads(code_block("json", '"serving_default"'))
    loaded = tf.saved_model.load(os.path.join(exported["export_dir"], "2"))
    signature = loaded.signatures[body.get("signature_name", "serving_default")]
    # TF Serving's row format: the instances, stacked, become the input converted to its dtype.
    images = np.asarray(body["instances"])
    assert images.min() >= 0 and images.max() <= 255 and images.ndim == 4 and images.shape[-1] == 3
    outputs = signature(images=tf.constant(images, tf.uint8))
    assert_outputs_match(
        {name: value.numpy() for name, value in outputs.items()},
        keras_outputs(exported["model"], images.astype(np.uint8)),
    )


def test_the_docs_rest_body_with_b64_fits_serving_bytes(exported):
    body = json.loads(code_block("json", '"b64"'))
    signature = tf.saved_model.load(os.path.join(exported["export_dir"], "2")).signatures[body["signature_name"]]
    # TF Serving's row format with binary strings: each {"b64": ...} becomes one item of the string input.
    image_bytes = [base64.b64decode(instance["b64"]) for instance in body["instances"]]
    outputs = signature(image_bytes=tf.constant(image_bytes))
    pixels = np.stack([tf.io.decode_png(data).numpy() for data in image_bytes])
    assert_outputs_match(
        {name: value.numpy() for name, value in outputs.items()}, keras_outputs(exported["model"], pixels)
    )


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "fine_tuned"])
def test_load_encoder_gives_the_keras_encoder_for_transfer_learning(exported, trainable):
    encoder = sk.load_encoder(exported["export_dir"])  # the highest version, 2
    images = exported["images"][:4]
    np.testing.assert_allclose(
        encoder(images).numpy(), keras_outputs(exported["model"], images)["embeddings"], rtol=0, atol=TOLERANCE
    )
    encoder.trainable = trainable
    classifier = keras.Sequential([encoder, keras.layers.Dense(10)])
    classifier.compile(
        optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    before = [weight.numpy() for weight in encoder.weights]
    history = classifier.fit(images, np.arange(4), batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    changed = [not np.array_equal(old, weight.numpy()) for old, weight in zip(before, encoder.weights)]
    assert any(changed) == trainable
    # The preprocessing stays the evaluation crop under fit's training=True: no random views.
    preprocessing = keras.Model(encoder.input, encoder.get_layer("preprocessing").output)
    np.testing.assert_array_equal(preprocessing(images, training=True), preprocessing(images, training=False))


def test_the_docs_transfer_learning_example_runs(exported, cifar10_500, tmp_path, monkeypatch):
    example = code_block("python", "sk.load_encoder(")
    for old, new in [
        ('"exports/cifar10"', repr(exported["export_dir"])),
        ('load_images("cifar10"', f'load_images("folder:{cifar10_500}"'),
        ("epochs=10", "epochs=1"),
    ]:
        assert old in example, f"the transfer learning example no longer contains {old!r}: update this test"
        example = example.replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(example, "transfer_learning_example", "exec"), namespace)
    assert len(namespace["classifier"].history.history["accuracy"]) == 1
    reloaded = keras.saving.load_model(tmp_path / "classifier.keras")
    images = exported["images"]
    np.testing.assert_allclose(
        reloaded(images).numpy(), namespace["classifier"](images).numpy(), rtol=0, atol=TOLERANCE
    )


def test_load_encoder_accepts_a_version_folder_and_names_what_is_missing(exported, tmp_path):
    first = sk.load_encoder(os.path.join(exported["export_dir"], "1"))
    assert first.output.shape[-1] == exported["model"].encoder.output.shape[-1]
    with pytest.raises(FileNotFoundError, match="neither a SavedModel"):
        sk.load_encoder(str(tmp_path))
    module = tf.Module()
    module.scale = tf.Variable(2.0)
    tf.saved_model.save(module, str(tmp_path / "other"))
    with pytest.raises(FileNotFoundError, match="not written by simclr_keras.export_encoder"):
        sk.load_encoder(str(tmp_path / "other"))


def run_export_main(capsys, *flags):
    """`python -m simclr_keras.export FLAGS` in this process, on its own absl FlagValues: (status, stderr)."""
    flag_values = absl_flags.FlagValues()
    export_command.define_flags(flag_values)
    argv = flag_values(["simclr_keras.export", *flags])
    with pytest.raises(SystemExit) as exit:
        export_command.main(argv, flag_values)
    return exit.value.code, capsys.readouterr().err


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_export_errors_end_in_one_line(tmp_path, capsys):
    export_file = tmp_path / "exports"
    export_file.write_text("a file")
    missing = tmp_path / "no_run"
    for flags, message in [
        ([f"--model_dir={tmp_path}", f"--export_dir={export_file}"],
         f"error: --export_dir={export_file} is a file; pass a directory (versions are written into it)."),
        ([f"--model_dir={missing}", f"--export_dir={tmp_path}"],
         f"error: --model_dir={missing} cannot be exported: {missing} is not a training run: model_config.json is missing."),
        ([f"--model_dir={tmp_path}", f"--export_dir={tmp_path}", "--max_image_side=0"],
         "error: --max_image_side=0: pass a positive number of pixels."),
        ([f"--model_dir={tmp_path}", f"--export_dir={tmp_path}", "--max_batch_size=-2"],
         "error: --max_batch_size=-2: pass a positive number of images."),
    ]:  # fmt: skip
        status, stderr = run_export_main(capsys, *flags)
        assert status == 1 and error_lines(stderr) == [message], stderr[-2000:]


def test_training_with_an_unwritable_export_dir_ends_in_one_line(cifar10_500, tmp_path):
    status, _, stderr = run_train_main(
        f"--dataset=folder:{cifar10_500}", f"--model_dir={tmp_path}", "--export_dir=/proc/export"
    )
    assert status == 1
    [line] = error_lines(stderr)
    assert line.startswith("error: --export_dir=/proc/export cannot be created"), stderr[-2000:]
