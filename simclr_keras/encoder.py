"""Encoder: a pretrained encoder as evaluation meets it, from a training run or from an export.

    encoder = Encoder.from_run_dir("runs/cifar10")            # the latest checkpoint
    encoder = Encoder.from_run_dir("runs/cifar10", random_init=True)  # the baseline: same architecture
    encoder = Encoder.from_export("exports/cifar10", head_layer=1)     # SimCLR v2's head-layer features
    features = encoder.features(images)  # uint8 [B, H, W, 3] -> float32 [B, D], inference mode

Both give the same features for the same weights: the evaluation preprocessing (the run's
augmenter with training=False: centre crop, bicubic resize to the training size, scale to
[0, 1]) and then the encoder, with BatchNorm on its moving statistics. An export's features come
from its `serving_default` signature; its Keras parts (for fine-tuning, the training size and
head layers the signature lacks) from `simclr_keras.export.load_exported_parts`. A run is read
by `simclr_keras.runs.load_model`.
"""

import dataclasses
from typing import Any, Callable

from simclr_keras import evaluation, export, runs
from simclr_keras.representation import first_line


@dataclasses.dataclass(frozen=True)
class Encoder:
    """A feature function and what evaluation needs around it.

    Attributes:
      features: uint8 images [B, H, W, 3] (or a padded batch {"images", "image_shapes"}) ->
        float32 [B, D]: h, or the projection head's `head_layer`-th layer; inference mode.
      source: the run directory, or the export's version folder.
      head_layer: 0 (h) or K, the projection head layer the features come from.
      image_size: int, the side of the encoder's views (the evaluation crop's output, the
        training size); None only for an export that takes any size and cannot be rebuilt.
      input_size: the side the export's signature requires, or None (any size; every run).
      backbone: keras.Model, float views in [0, 1] -> h, with trainable weights (for
        fine-tuning); None for an export that cannot be rebuilt (`rebuild_error` says why).
      preprocess: uint8 images -> float32 views [B, S, S, 3] in [0, 1], or None without a backbone.
      projection_head: the run's or export's ProjectionHead, or None.
      crop_sampler: the crop sampler of the run's augmenter ("tensorflow" when unknown).
      class_names: the run's class names (classes.json), or None.
      checkpoint: the checkpoint restored, None for random_init or an export.
      random_init: True for the freshly initialised architecture of a run.
      augmenter: the run's or export's augmenter (its training mode makes the pretraining views), or None.
    """

    features: Callable[[Any], Any]
    source: str
    head_layer: int = 0
    image_size: int | None = None
    input_size: int | None = None
    backbone: Any = None
    preprocess: Callable[[Any], Any] | None = None
    projection_head: Any = None
    crop_sampler: str = "tensorflow"
    class_names: tuple | None = None
    checkpoint: str | None = None
    random_init: bool = False
    rebuild_error: str | None = None
    augmenter: Any = None

    def view_features(self):
        """Feature function of views already at the encoder's size (float32 [B, S, S, 3] in [0, 1]).

        The backbone (and head up to `head_layer`) in inference mode, skipping the evaluation
        preprocessing, so that a random crop is not centre-cropped again. Without a backbone (an
        export written by other code) its signature, whose own preprocessing is unknown here, takes them.
        """
        if self.backbone is None:
            return evaluation.feature_function_of_uint8_views(self.features)
        return evaluation.feature_function_of_views(self.backbone, self.projection_head, self.head_layer)

    def at_view_size(self, image_size):
        """This encoder with evaluation views of side `image_size` instead of the training size.

        The evaluation preprocessing keeps its crop fraction and resizes to `image_size`; the backbone
        (global pooling takes any size) gives the features in inference mode. The HCL/DCL references'
        STL-10 setting pretrains on 32 px crops and evaluates the whole 96 px images. Raises
        ValueError (one line) for an encoder without backbone or augmenter to resize.
        """
        if image_size == self.image_size:
            return self
        if self.backbone is None or self.augmenter is None:
            raise ValueError(
                f"image_size={image_size}: {self.source} makes its views at its own size in its signature and cannot "
                f"be rebuilt ({self.rebuild_error}); leave image_size unset."
            )
        try:
            resized = type(self.augmenter).from_config({**self.augmenter.get_config(), "image_size": image_size})
        except Exception as error:  # an augmenter of another class, without image_size
            raise ValueError(
                f"image_size={image_size}: the augmenter {type(self.augmenter).__name__} of {self.source} cannot be "
                f"rebuilt at another size ({first_line(error)}); leave image_size unset."
            ) from None
        view_features = self.view_features()

        def preprocess(images):
            return resized(images, training=False)  # (B, image_size, image_size, 3)

        features = evaluation.feature_function_of_preprocessed(preprocess, view_features)
        return dataclasses.replace(self, features=features, image_size=image_size, preprocess=preprocess)

    @classmethod
    def from_model(cls, model, head_layer=0, source="", **attributes):
        """The encoder of a SimCLR model in memory (anything with encoder, augmenter, projection_head).

        Raises ValueError when the projection head has no layer `head_layer`.
        """
        model.projection_head._check_head_layer(head_layer)  # its message names head_layer and the range
        return cls(
            features=evaluation.feature_function_from_model(model, head_layer),
            source=source,
            head_layer=head_layer,
            image_size=model.augmenter.output_height,
            backbone=model.encoder,
            preprocess=lambda images: model.augmenter(images, training=False),
            projection_head=model.projection_head,
            crop_sampler=getattr(model.augmenter, "crop_sampler", "tensorflow"),
            augmenter=model.augmenter,
            **attributes,
        )

    @classmethod
    def from_run_dir(cls, model_dir, head_layer=0, random_init=False):
        """The encoder of a training run's latest checkpoint, or (random_init) of its fresh architecture.

        The fresh weights are drawn from Keras' global seed (`keras.utils.set_random_seed`).
        Raises FileNotFoundError when model_dir is not a training run, ValueError for a head_layer
        its projection head lacks.
        """
        model = runs.load_model(model_dir, restore=False)
        checkpoint = None if random_init else runs.restore_latest_checkpoint(model, model_dir)
        return cls.from_model(
            model, head_layer, source=model_dir, class_names=runs.load_class_names(model_dir),
            checkpoint=checkpoint, random_init=random_init,
        )  # fmt: skip

    @classmethod
    def from_export(cls, path, head_layer=0):
        """The encoder of an export (EXPORT_DIR/<version>, or EXPORT_DIR for its highest version).

        The features are the signature's `embeddings` (or `head_layer_K`); an export without that
        output, written by `export_encoder`, gives them from its rebuilt Keras parts instead.
        SavedModels written by other code work for features when their signature takes uint8
        `images`. Raises FileNotFoundError when path holds no SavedModel, ValueError when its
        signature cannot give the features.
        """
        version_dir = export.resolve_version_dir(path)
        output = export.head_layer_output_name(head_layer) if head_layer else export.EMBEDDINGS
        try:
            features, input_size = evaluation.feature_function_from_saved_model(version_dir, output)
        except ValueError:
            if not head_layer:
                raise
            features, input_size = None, None  # no head_layer_K output: the rebuilt head gives it
        except Exception as error:  # tf.saved_model.load raises several types for what is no SavedModel
            raise ValueError(
                f"{path} is not an exported encoder ({first_line(error)}); pass EXPORT_DIR/<version> written by "
                "simclr_keras.export."
            ) from None
        parts, rebuild_error = _exported_parts(version_dir, head_layer)
        if parts is None:
            if features is None:
                raise ValueError(
                    f"head_layer={head_layer}: {path} has no head_layer_{head_layer} output and cannot be rebuilt "
                    f"with its projection head ({rebuild_error})."
                )
            return cls(features, version_dir, head_layer, input_size, input_size, rebuild_error=rebuild_error)
        if features is None:
            features = evaluation.feature_function_from_model(parts, head_layer)
        return cls(
            features=features,
            source=version_dir,
            head_layer=head_layer,
            image_size=parts.augmenter.output_height,
            input_size=input_size,
            backbone=parts.encoder,
            preprocess=lambda images: parts.augmenter(images, training=False),
            projection_head=parts.projection_head,
            crop_sampler=getattr(parts.augmenter, "crop_sampler", "tensorflow"),
            augmenter=parts.augmenter,
        )


def _exported_parts(version_dir, head_layer):
    """(export.ExportedParts, None), or (None, why not) for an export `load_exported_parts` cannot rebuild."""
    try:
        return export.load_exported_parts(version_dir, head_layer), None
    except Exception as error:  # it raises several types for exports it did not write
        return None, first_line(error)
