"""The encoder as a TensorFlow Serving SavedModel, and back as a trainable Keras model.

    EXPORT_DIR/               TF Serving's model base path; it serves the highest version
      1/
        saved_model.pb        signatures "serving_default" (uint8 pixels) and "serving_bytes" (encoded images)
        variables/            encoder and projection head weights, stored once
        assets.extra/simclr_keras.json   Keras configs of encoder and preprocessing (for load_encoder)
      2/ ...

`export_encoder` writes the next version; an existing version is never written to. `serving_default`
takes `images`, uint8 [batch, height, width, channels] of any height and width, and applies the
evaluation preprocessing inside the graph (`SimCLRAugmentation(training=False)`: centre crop,
bicubic resize to the training size, scale to [0, 1]), so clients send raw pixels. `serving_bytes`
takes `image_bytes`, string [batch] of encoded JPEG, PNG, GIF or BMP images, decoded in the graph.
Both return `embeddings`, the representation h (float32 [batch, D]), and `projections`, g(h)
(float32 [batch, proj_dim]); an export written with `head_layer=K` also returns `head_layer_K`, the
output of the projection head's K-th layer (SimCLR v2's `ft_proj_selector` features). Requests are
bounded (`max_image_side`, `max_batch_size`, fixed at export time), grayscale and alpha are
converted as in training, and an empty batch gets [0, D]: see `serving_inputs`.

`load_encoder` rebuilds a trainable `keras.Model` with the same input convention (uint8 images of
any size -> h) from the configs in assets.extra/ and the SavedModel's variables, so that the
weights are stored only once. TF Serving ignores assets.extra/.

The command line is `python -m simclr_keras.export` (simclr_keras/export/__main__.py).
"""

import dataclasses
import json
import os
import shutil
import tempfile

import keras
import tensorflow as tf

from simclr_keras.export import serving_inputs
from simclr_keras.representation import representation_shape, views_shape

__all__ = [
    "EvaluationPreprocessing", "ExportedParts", "export_encoder", "export_versions", "load_encoder",
    "load_exported_parts", "resolve_version_dir",
]  # fmt: skip

SIGNATURE_NAME = "serving_default"
INPUT_NAME = "images"
BYTES_SIGNATURE_NAME = "serving_bytes"
BYTES_INPUT_NAME = "image_bytes"
EMBEDDINGS = "embeddings"
PROJECTIONS = "projections"


def head_layer_output_name(head_layer):
    """The signature output holding the projection head's `head_layer`-th layer."""
    return f"head_layer_{head_layer}"

# assets.extra/ is the SavedModel folder for files that TF Serving and tf.saved_model.load ignore.
METADATA_PATH = os.path.join("assets.extra", "simclr_keras.json")


def _variables_by_path(layer):
    """The tf.Variables inside a Keras layer's weights, keyed by weight path ("conv1/kernel")."""
    variables = {weight.path: weight.value for weight in layer.weights}
    if len(variables) != len(layer.weights):  # a shared path would silently drop a weight
        raise ValueError(f"the weights of {layer.name} do not have distinct paths; rename its layers.")
    return variables


def _saved_weights(layer):
    """[[path, shape], ...] of `layer.weights`, in order: the keys the SavedModel stores them under.

    A weight's path depends on the name scope it was built in (a Sequential encoder built inside
    SimCLR has `sequential/conv2d/kernel`, the same one deserialised alone `conv2d/kernel`), but the
    order of `layer.weights` follows the layers' structure (tracking order, then creation order
    within a layer), which a model rebuilt from its config shares. So `load_exported_parts` pairs
    the rebuilt weights with these keys by position, checking each shape.
    """
    return [[weight.path, list(weight.shape)] for weight in layer.weights]


def _variables_by_saved_path(layer, saved_weights, description):
    """The rebuilt `layer`'s tf.Variables keyed by the paths the export stored them under.

    `saved_weights` is `_saved_weights` of the exported layer, or None for an export written before
    they were recorded: those are keyed by the rebuilt paths, which match for functional encoders.
    Raises ValueError (one line) when the rebuilt layer's weights do not pair with the saved ones.
    """
    if saved_weights is None:
        return _variables_by_path(layer)
    weights = layer.weights
    if len(weights) != len(saved_weights):
        raise ValueError(
            f"the rebuilt {description} has {len(weights)} weights where the export saved {len(saved_weights)}; "
            "its class must rebuild the same layers from its config (get_config)."
        )
    for weight, (path, shape) in zip(weights, saved_weights):
        if list(weight.shape) != list(shape):
            raise ValueError(
                f"the rebuilt {description}'s weight {weight.path} has shape {tuple(weight.shape)} where the export "
                f"saved {path} with shape {tuple(shape)}; its class must rebuild the same layers from its config."
            )
    return {path: weight.value for weight, (path, _) in zip(weights, saved_weights)}


class _ServingModule(tf.Module):
    """The object tf.saved_model.save writes: the weights' tf.Variables and the two signatures.

    The tf.Variables that Keras weights wrap are tracked, not the Keras layers: saving a Keras 3
    weight adds a second, differently named copy of it to the graph, and TF Serving (like
    saved_model_cli run) restores the copy while the signature reads the original, which it then
    finds uninitialised. The variables are keyed by path; the metadata lists those keys in
    `weights` order, by which they restore into a rebuilt encoder (`load_encoder`, whose paths may
    differ: `_saved_weights`). The augmenter is not tracked: its evaluation path has no variables. What a
    request goes through before the encoder (bounds, channels, decoding) is `serving_inputs`.
    """

    def __init__(self, encoder, projection_head, augmenter, head_layer, max_image_side, max_batch_size):
        super().__init__(name="simclr_encoder")
        self.encoder_variables = _variables_by_path(encoder)
        self.projection_head_variables = _variables_by_path(projection_head)

        def outputs(views, batch_size):
            """The signature outputs of views [max(B, 1), S, S, 3], float32 in [0, 1], cut to B rows."""
            embeddings = encoder(views, training=False)  # (B, D)
            # Encoder and head return float32 under any dtype policy; the casts pin the signature.
            results = {EMBEDDINGS: embeddings, PROJECTIONS: projection_head(embeddings, training=False)}
            if head_layer:
                results[head_layer_output_name(head_layer)] = projection_head(
                    embeddings, training=False, head_layer=head_layer
                )
            return {name: tf.cast(value, tf.float32)[:batch_size] for name, value in results.items()}

        # Any number of channels in the spec: the graph applies the channel rule or names the count.
        @tf.function(input_signature=[tf.TensorSpec([None, None, None, None], tf.uint8, name=INPUT_NAME)])
        def serve(images):
            images = serving_inputs.checked_images(images, max_image_side, max_batch_size)
            batch_size = tf.shape(images)[0]
            views = serving_inputs.views_or_placeholder(
                batch_size, lambda: serving_inputs.evaluation_views(images, augmenter), augmenter
            )  # (max(B, 1), S, S, 3)
            return outputs(views, batch_size)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=BYTES_INPUT_NAME)])
        def serve_bytes(image_bytes):
            views = serving_inputs.decoded_views(image_bytes, augmenter, max_image_side, max_batch_size)
            batch_size = tf.shape(views)[0]
            return outputs(serving_inputs.views_or_placeholder(batch_size, lambda: views, augmenter), batch_size)

        self.serve = serve
        self.serve_bytes = serve_bytes


def export_versions(export_dir):
    """The version numbers in export_dir (folders named by an integer), ascending; [] if none."""
    if not os.path.isdir(export_dir):
        return []
    return sorted(int(name) for name in os.listdir(export_dir) if name.isascii() and name.isdigit())


def resolve_version_dir(path):
    """Returns path itself if it holds a SavedModel, else its highest version folder.

    Raises FileNotFoundError, naming what was looked for, when neither holds a saved_model.pb.
    """
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    versions = export_versions(path)
    if not versions:
        raise FileNotFoundError(
            f"{path} is neither a SavedModel (no saved_model.pb) nor an export directory of version "
            "folders <n>/saved_model.pb written by simclr_keras.export_encoder."
        )
    version_dir = os.path.join(path, str(versions[-1]))
    if not os.path.isfile(os.path.join(version_dir, "saved_model.pb")):
        raise FileNotFoundError(f"the highest version {version_dir} holds no saved_model.pb.")
    return version_dir


def export_encoder(
    model,
    export_dir,
    head_layer=None,
    max_image_side=serving_inputs.DEFAULT_MAX_IMAGE_SIDE,
    max_batch_size=serving_inputs.DEFAULT_MAX_BATCH_SIZE,
):
    """Writes the encoder of a SimCLR model to export_dir/<n>, n one above the highest version there.

    The SavedModel is written to a temporary folder inside export_dir first (a name TF Serving
    ignores) and renamed into place, so a server polling export_dir never loads a partial version,
    and an existing version, even one created meanwhile by another export, is never overwritten.

    Args:
      model: a `simclr_keras.SimCLR` (anything with `encoder`, `projection_head` and `augmenter`),
        e.g. from `build_simclr` or `simclr_keras.runs.load_model`.
      export_dir: TF Serving's model base path; created if missing.
      head_layer: K >= 1 adds the signature output `head_layer_K`, the projection head's K-th layer
        in inference mode (SimCLR v2 fine-tunes from K = 1 of a 3-layer head); None: none.
      max_image_side: int, the longest image side, in pixels, the signatures accept; a larger image
        is refused (InvalidArgument) before any work on it. It bounds a request's memory.
      max_batch_size: int, the most images a request may hold.

    Returns:
      The path of the new version folder, export_dir/<n>.
    """
    if head_layer is not None:
        model.projection_head._check_head_layer(head_layer)  # the ValueError names the valid range
    for name, value in (("max_image_side", max_image_side), ("max_batch_size", max_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer. Received: {name}={value!r}")
    os.makedirs(export_dir, exist_ok=True)
    staging_dir = tempfile.mkdtemp(prefix=".export-", dir=export_dir)
    try:
        module = _ServingModule(
            model.encoder, model.projection_head, model.augmenter, head_layer, max_image_side, max_batch_size
        )
        signatures = {SIGNATURE_NAME: module.serve, BYTES_SIGNATURE_NAME: module.serve_bytes}
        tf.saved_model.save(module, staging_dir, signatures=signatures)
        metadata = {
            "encoder": keras.saving.serialize_keras_object(model.encoder),
            "augmenter": keras.saving.serialize_keras_object(model.augmenter),
            "projection_head": keras.saving.serialize_keras_object(model.projection_head),
            "head_layer": head_layer,
            # The SavedModel's keys of each part's weights, in `weights` order (`_saved_weights`).
            "saved_weights": {
                "encoder": _saved_weights(model.encoder), "projection_head": _saved_weights(model.projection_head),
            },
            "max_image_side": max_image_side,
            "max_batch_size": max_batch_size,
        }
        os.makedirs(os.path.join(staging_dir, os.path.dirname(METADATA_PATH)), exist_ok=True)
        with open(os.path.join(staging_dir, METADATA_PATH), "w", encoding="utf-8") as file:
            json.dump(metadata, file)
        while True:
            version_dir = os.path.join(export_dir, str(max(export_versions(export_dir), default=0) + 1))
            if not os.path.exists(version_dir):
                try:
                    os.rename(staging_dir, version_dir)
                    return version_dir
                except OSError:
                    if not os.path.exists(version_dir):
                        raise
            # Another export took this number between listing and renaming: try the next one.
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)


@keras.saving.register_keras_serializable(package="simclr_keras")
class EvaluationPreprocessing(keras.layers.Layer):
    """The evaluation path of a `SimCLRAugmentation`, as a layer that fit() cannot switch to training.

    A functional model passes its own `training` flag to every layer whose `call` takes one, which
    would turn the augmenter's deterministic centre crop into random views during fine-tuning. This
    layer's `call` has no `training` argument and always calls `augmenter(images, training=False)`.

    Args:
      augmenter: a `SimCLRAugmentation` (or its serialized config).
    """

    def __init__(self, augmenter, **kwargs):
        super().__init__(**kwargs)
        if isinstance(augmenter, dict):
            augmenter = keras.saving.deserialize_keras_object(augmenter)
        self.augmenter = augmenter
        # uint8 inputs must reach the augmenter uncast, as in SimCLRAugmentation itself.
        self._convert_input_args = False
        self._allow_non_tensor_positional_args = True

    def call(self, images):
        return self.augmenter(images, training=False)  # (B, S, S, 3) float32 in [0, 1]

    def compute_output_shape(self, input_shape):
        return self.augmenter.compute_output_shape(input_shape)

    def compute_output_spec(self, images):
        return keras.KerasTensor(self.compute_output_shape(images.shape), dtype="float32")

    def get_config(self):
        config = super().get_config()
        config["augmenter"] = keras.saving.serialize_keras_object(self.augmenter)
        return config


def load_encoder(path, head_layer=0):
    """The exported encoder as a trainable `keras.Model`: uint8 images of any size -> h, float32 [B, D].

    Inside, the evaluation preprocessing (`EvaluationPreprocessing`: centre crop, bicubic resize to
    the training size, scale to [0, 1]; no weights) feeds the encoder, exactly as in the SavedModel's
    signature, and stays deterministic during `fit`. Inputs are uint8 in [0, 255]; float inputs are
    read on the same 0-255 scale (`keras.Sequential` casts its inputs to float32, which is
    harmless). The bare encoder, float images in [0, 1] of the training size, is
    `load_encoder(path).get_layer("encoder")`.

    Usable for transfer learning: `keras.Sequential([load_encoder(path), keras.layers.Dense(10)])`,
    with `trainable = False` on the encoder for a frozen one (its BatchNorm then also stays in
    inference mode) or left trainable for fine-tuning. The model saves to `.keras`.

    With `head_layer` K > 0 the model continues through the first K layers of the exported
    projection head (trainable, with its BatchNorm), and returns the K-th layer's output: SimCLR
    v2's starting point for fine-tuning (`ft_proj_selector`).

    Args:
      path: a version folder written by `export_encoder` (EXPORT_DIR/<n>), or EXPORT_DIR itself
        for its highest version.
      head_layer: 0 (h) or a layer of the projection head, 1 to its number of layers.

    Raises:
      FileNotFoundError: path holds no SavedModel, or one not written by `export_encoder`.
    """
    parts = load_exported_parts(path, head_layer)
    images = keras.Input(shape=(None, None, 3), dtype="uint8", name=INPUT_NAME)
    views = EvaluationPreprocessing(parts.augmenter, name="preprocessing")(images)  # (B, S, S, 3)
    features = parts.encoder(views)
    if parts.projection_head is not None:
        features = parts.projection_head(features, head_layer=head_layer)
    return keras.Model(images, features, name="simclr_encoder")


@dataclasses.dataclass(frozen=True)
class ExportedParts:
    """What `export_encoder` wrote, rebuilt as Keras objects with the exported weights.

    encoder: keras.Model, float images in [0, 1] of the training size -> h [B, D] (trainable).
    augmenter: the run's `SimCLRAugmentation`; `augmenter(images, training=False)` is the
      evaluation preprocessing of the signature.
    projection_head: the exported `ProjectionHead` with its weights, or None (head_layer 0).
    version_dir: the version folder read.
    """

    encoder: keras.Model
    augmenter: keras.layers.Layer
    projection_head: keras.layers.Layer | None
    version_dir: str


def _read_metadata(version_dir):
    metadata_path = os.path.join(version_dir, METADATA_PATH)
    if not os.path.isfile(metadata_path):
        raise FileNotFoundError(
            f"{version_dir} has no {METADATA_PATH}, so it was not written by simclr_keras.export_encoder; "
            "use tf.saved_model.load or keras.layers.TFSMLayer for inference instead."
        )
    with open(metadata_path, encoding="utf-8") as file:
        return json.load(file)


def load_exported_parts(path, head_layer=0):
    """The encoder, augmenter and (with `head_layer` > 0) projection head of an export, as Keras objects.

    The configs come from assets.extra/, the weights from the SavedModel's variables (a checkpoint
    of `_ServingModule`), so they are stored once. `load_encoder` assembles these parts into one
    model. Raises FileNotFoundError as `load_encoder` does, ValueError for a head_layer the head lacks.
    """
    version_dir = resolve_version_dir(path)
    metadata = _read_metadata(version_dir)
    encoder = keras.saving.deserialize_keras_object(metadata["encoder"])
    saved_weights = metadata.get("saved_weights", {})  # absent from exports of earlier versions
    augmenter = keras.saving.deserialize_keras_object(metadata["augmenter"])
    if not encoder.built:  # a Sequential without Input or a subclassed encoder: build it on the views
        representation_shape(encoder, views_shape(augmenter))
    parts = {"encoder_variables": _variables_by_saved_path(encoder, saved_weights.get("encoder"), "encoder")}
    head = None
    if head_layer:
        if "projection_head" not in metadata:
            raise FileNotFoundError(
                f"{version_dir} was exported without its projection head's config; head_layer={head_layer} "
                "needs an export written by this version of simclr_keras.export_encoder."
            )
        head = keras.saving.deserialize_keras_object(metadata["projection_head"])
        head._check_head_layer(head_layer)
        if not head.built:  # the serialized config usually carries its build shape
            head.build(representation_shape(encoder, views_shape(augmenter)))
        parts["projection_head_variables"] = _variables_by_saved_path(
            head, saved_weights.get("projection_head"), "projection head"
        )
    # The head's variables are read only when needed. read(), unlike restore(), adds no save
    # counter that the SavedModel would lack.
    tf.train.Checkpoint(**parts).read(
        os.path.join(version_dir, "variables", "variables")
    ).expect_partial().assert_existing_objects_matched()
    return ExportedParts(encoder, augmenter, head, version_dir)
