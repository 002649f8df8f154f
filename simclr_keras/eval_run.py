"""evaluate_encoder(config): one evaluation of a pretrained encoder, as `python -m simclr_keras.evaluate` runs it.

    result = evaluate_encoder(EvalConfig(protocol="knn", model_dir="runs/cifar10", dataset="folder:DIR"))
    result.top1, result.results  # the accuracy; everything --output writes as JSON

The steps: check the dataset's folders, load the `Encoder`, load the labelled images, run the
protocol (`simclr_keras.evaluation`: kNN, linear evaluation or fine-tuning), then write the results
JSON (config.output) and the test confusion matrix. A problem the user can fix raises
`EvaluationError` (a ValueError) whose one-line message names the config field, the value received
and what would be right; the command line writes the fields as --flags (`config_flags.as_flag_message`).
"""

import dataclasses
import json
import os
import re
import sys
import time

import keras
import numpy as np

from simclr_keras import data, evaluation, optimizers
from simclr_keras.cli import warn_about_data
from simclr_keras.encoder import Encoder
from simclr_keras.eval_config import EvalConfig


class EvaluationError(ValueError):
    """A setting or input of an evaluation that cannot work, in one line naming the config field."""


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """What an evaluation measured.

    top1, top5: test accuracies in [0, 1]. results: the dict written to config.output as JSON
    (accuracies, example counts, every setting used, seconds). summary: the one line the command
    line prints. scores: float32 [N_test, C] class scores; test_labels: int64 [N_test] (None for finetune).
    confusion_matrix: the PNG written, or None.
    """

    top1: float
    top5: float
    num_train: int
    num_test: int
    num_classes: int
    results: dict
    summary: str
    scores: np.ndarray
    test_labels: np.ndarray | None
    confusion_matrix: str | None = None


@dataclasses.dataclass
class _LabelledImages:
    """The labelled images of one evaluation: unbatched (uint8 image, label) datasets and their batches."""

    train_examples: object
    train_labels: np.ndarray | None  # None: known after feature extraction
    train_batches: object
    test_examples: object
    test_batches: object
    num_classes: int
    class_names: tuple


@dataclasses.dataclass
class _Outcome:
    """What a protocol step returns: its result, the settings it used, its description."""

    result: evaluation.ClassificationResult
    settings: dict
    description: str
    num_train: int
    test_labels: np.ndarray | None  # None: not read (finetune)


def evaluate_encoder(config: EvalConfig) -> EvalResult:
    """Runs the evaluation `config` describes; see the module docstring. Raises EvaluationError or
    simclr_keras.data.DatasetNotFoundError (both ValueError) with a one-line message."""
    problems = config.validate()
    if problems:
        raise EvaluationError(" ".join(problems))
    config = config.resolved()
    data.check_dataset(config.dataset, [config.train_split, config.eval_split])  # a listing, before the encoder
    started = time.time()
    keras.utils.set_random_seed(config.seed)
    encoder = _encoder_of(config)
    image_size, encoder = _encoder_at_image_size(config, encoder)
    labelled = _labelled_images(config, image_size)
    outcome = PROTOCOL_STEPS[config.protocol](config, encoder, labelled, image_size)
    results = _results(config, encoder, image_size, labelled, outcome, started)
    _write_results(config, results)
    confusion_path = _confusion_matrix_path(config)
    if confusion_path:
        _write_confusion_matrix(confusion_path, config, encoder, labelled, outcome)
    description = outcome.description + (f" on head layer {config.head_layer}" if config.head_layer else "")
    source = ("random-init " if config.random_init else "") + encoder.source
    result = outcome.result
    summary = (
        f"{description} of {source} on {config.dataset}:{config.eval_split}: top-1 {result.top1:.4f}, "
        f"top-5 {result.top5:.4f} ({results['num_train']} train, {results['num_test']} test images, "
        f"{labelled.num_classes} classes)"
    )
    return EvalResult(
        result.top1, result.top5, results["num_train"], results["num_test"], labelled.num_classes, results, summary,
        result.scores, outcome.test_labels, confusion_path,
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# Encoder and data
# --------------------------------------------------------------------------------------


def _field_message(error, field, value):
    """An Encoder error naming the field it is about: as it is when it starts with a field's name
    (e.g. "head_layer must be ..."), else prefixed with `field=value: `."""
    message = str(error)
    first_word = re.match(r"\w*", message).group()
    if first_word in {known.name for known in dataclasses.fields(EvalConfig)}:
        return message
    return f"{field}={value}: {message}"


def _encoder_of(config):
    """The Encoder config names: config.model_dir's run (random_init: its architecture) or config.encoder."""
    try:
        if config.model_dir:
            return Encoder.from_run_dir(config.model_dir, config.head_layer, config.random_init)
        return Encoder.from_export(config.encoder, config.head_layer)
    except (FileNotFoundError, ValueError) as error:
        field, value = ("model_dir", config.model_dir) if config.model_dir else ("encoder", config.encoder)
        raise EvaluationError(_field_message(error, field, value)) from None


def _encoder_at_image_size(config, encoder):
    """(the side of the evaluation views, the encoder that makes them): config.image_size, else the export's
    fixed input, else the training size. A size other than the training size resizes the evaluation
    views (`Encoder.at_view_size`): e.g. 96 px for an encoder pretrained on 32 px crops of STL-10."""
    if config.image_size and encoder.input_size and config.image_size != encoder.input_size:
        raise EvaluationError(
            f"image_size={config.image_size} differs from the {encoder.input_size} px the exported encoder takes."
        )
    image_size = config.image_size or encoder.input_size or encoder.image_size
    if not image_size:
        raise EvaluationError(
            f"encoder={config.encoder} accepts any image size; pass image_size (the pretraining size)."
        )
    if not encoder.input_size and image_size != encoder.image_size:
        try:
            encoder = encoder.at_view_size(image_size)
        except ValueError as error:
            raise EvaluationError(str(error)) from None
    return image_size, encoder


def _labelled_images(config, image_size):
    """The training and test images, with the labelled training subset the protocol uses."""
    train_examples, train_info = data.load_images(
        config.dataset, config.train_split, image_size, config.data_dir, config.max_train_examples, config.strict_data
    )
    test_examples, test_info = data.load_images(
        config.dataset, config.eval_split, image_size, config.data_dir, strict=config.strict_data
    )
    warn_about_data(config.dataset, config.train_split, train_info)
    warn_about_data(config.dataset, config.eval_split, test_info)
    splits = (("train_split", config.train_split, train_info), ("eval_split", config.eval_split, test_info))
    for field, split, info in splits:
        if not info.num_classes:
            raise EvaluationError(f"{field}={split} of dataset={config.dataset} has no labels.")
    # Unlabelled images (label -1, e.g. a folder's unlabeled/) take no part in any protocol.
    test_examples = test_examples.filter(lambda image, label: label >= 0)
    test_batches = data.evaluation_batches(test_examples, test_info, config.eval_batch_size, image_size)

    # The labelled training examples: all of them, or a class-balanced fraction.
    train_labels = None
    augmented = config.linear_augment or (config.protocol == "linear" and config.linear_protocol == "hcl_dcl")
    if config.label_fraction < 1.0 or config.protocol == "finetune" or augmented:
        all_labels = evaluation.example_labels(train_examples)
        indices = evaluation.label_fraction_subset(all_labels, config.label_fraction, config.seed)
        if len(indices) == 0:
            raise EvaluationError(
                f"train_split={config.train_split} of dataset={config.dataset} has no labelled images."
            )
        train_examples = evaluation.select_examples(train_examples, indices, len(all_labels))
        train_labels = all_labels[indices]
    else:
        train_examples = train_examples.filter(lambda image, label: label >= 0)
    train_batches = data.evaluation_batches(train_examples, train_info, config.eval_batch_size, image_size)
    return _LabelledImages(
        train_examples, train_labels, train_batches, test_examples, test_batches, train_info.num_classes,
        test_info.class_names,
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# Protocols
# --------------------------------------------------------------------------------------


def _knn(config, encoder, labelled, image_size):
    train_features, train_labels = evaluation.extract_features(encoder.features, labelled.train_batches)
    test_features, test_labels = evaluation.extract_features(encoder.features, labelled.test_batches)
    _, scores = evaluation.knn_classify(
        train_features, train_labels, test_features, config.knn_k, config.knn_temperature, labelled.num_classes
    )
    result = evaluation.ClassificationResult(
        top1=evaluation.top_k_accuracy(scores, test_labels, 1),
        top5=evaluation.top_k_accuracy(scores, test_labels, 5),
        scores=scores,
    )
    k_used = min(config.knn_k, len(train_labels))
    settings = {"knn_k": config.knn_k, "knn_k_used": k_used, "knn_temperature": config.knn_temperature}
    description = f"knn (k={k_used}, T={config.knn_temperature:g})"
    return _Outcome(result, settings, description, len(train_labels), test_labels)


def _optimizer_settings(config, num_train):
    """The settings of a trained protocol; a batch larger than the training set is the whole set."""
    epochs, batch_size, base_learning_rate = config.protocol_defaults()
    batch_size = min(batch_size, num_train)
    return {
        "epochs": epochs,
        "batch_size": batch_size,
        "base_learning_rate": base_learning_rate,
        # The rate is scaled by the batch used.
        "learning_rate": optimizers.scale_learning_rate(base_learning_rate, batch_size, config.lr_scaling),
        "lr_scaling": config.lr_scaling,
        "optimizer": config.optimizer,
        "momentum": config.momentum,
        "nesterov": config.optimizer == "sgd",
        "weight_decay": config.weight_decay,
    }


def _trained_outcome(name, result, settings, num_train, test_labels):
    epochs, batch_size, learning_rate = settings["epochs"], settings["batch_size"], settings["learning_rate"]
    description = f"{name} ({epochs} epochs, batch {batch_size}, lr {learning_rate:g})"
    settings.update(train_loss=result.train_loss, train_top1=result.train_top1)
    return _Outcome(result, settings, description, num_train, test_labels)


def _linear(config, encoder, labelled, image_size):
    if config.linear_protocol == "hcl_dcl":
        return _linear_hcl_dcl(config, encoder, labelled)
    train_labels = labelled.train_labels
    if config.linear_augment:
        # Views of the training size, cropped as pretraining did (the official sampler otherwise), go
        # straight to the encoder: `features` would centre-crop them again above 32 px.
        train_features = evaluation.augmented_feature_epochs(
            encoder.view_features(), labelled.train_examples, len(train_labels), encoder.image_size or image_size,
            config.eval_batch_size, config.seed, crop_sampler=encoder.crop_sampler,
        )  # fmt: skip
    else:
        train_features, train_labels = evaluation.extract_features(encoder.features, labelled.train_batches)
    test_features, test_labels = evaluation.extract_features(encoder.features, labelled.test_batches)
    settings = _optimizer_settings(config, len(train_labels))
    result = evaluation.linear_evaluation(
        train_features, train_labels, test_features, test_labels, labelled.num_classes,
        epochs=settings["epochs"], batch_size=settings["batch_size"], learning_rate=settings["learning_rate"],
        momentum=config.momentum, weight_decay=config.weight_decay, standardize=config.standardize_features,
        seed=config.seed, verbose=2, optimizer=config.optimizer,
    )  # fmt: skip
    protocol = evaluation.linear_protocol_name(config.linear_augment, config.standardize_features)
    settings.update(
        linear_protocol=protocol,
        linear_augment=config.linear_augment,
        standardize_features=config.standardize_features,
        crop_sampler=encoder.crop_sampler if config.linear_augment else None,
    )
    return _trained_outcome(f"linear[{protocol}]", result, settings, len(train_labels), test_labels)


def _linear_hcl_dcl(config, encoder, labelled):
    """The HCL/DCL references' linear.py: training views of the pretraining augmentation, the encoder's
    BatchNorm in training mode, Adam with L2; the test features then in inference mode, from the
    rebuilt encoder whose moving statistics the training moved (not an export's signature)."""
    if encoder.backbone is None or encoder.augmenter is None:
        raise EvaluationError(
            f"linear_protocol=hcl_dcl runs the encoder in training mode, and encoder={config.encoder} cannot be "
            f"rebuilt by simclr_keras.export.load_encoder ({encoder.rebuild_error}); pass model_dir=RUN."
        )
    num_train = len(labelled.train_labels)
    epochs, batch_size, learning_rate = config.protocol_defaults()
    batch_size = min(batch_size, num_train)
    augmenter = encoder.augmenter
    features_of_epoch = evaluation.training_mode_feature_epochs(
        encoder.backbone, labelled.train_examples, num_train,
        lambda images, seed: augmenter(images, training=True, seed=seed), augmenter.output_height, batch_size,
        config.seed, encoder.projection_head, config.head_layer,
    )  # fmt: skip
    test_feature_function = evaluation.feature_function_of_preprocessed(encoder.preprocess, encoder.view_features())
    result = evaluation.reference_linear_evaluation(
        features_of_epoch, lambda: evaluation.extract_features(test_feature_function, labelled.test_batches),
        labelled.num_classes, epochs, batch_size, learning_rate,
        config.weight_decay, config.seed, verbose=2,
    )  # fmt: skip
    settings = {
        "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate, "optimizer": "adam",
        "weight_decay": config.weight_decay, "linear_protocol": "hcl_dcl", "train_view_size": augmenter.output_height,
        "encoder_batch_norm": "training mode (batch statistics)",
    }  # fmt: skip
    name = f"linear[hcl_dcl] ({epochs} epochs, batch {batch_size}, Adam lr {learning_rate:g})"
    settings.update(train_loss=result.train_loss, train_top1=result.train_top1)
    return _Outcome(result, settings, name, num_train, None)


def _finetune(config, encoder, labelled, image_size):
    if encoder.backbone is None:
        raise EvaluationError(
            f"protocol=finetune needs trainable weights, and encoder={config.encoder} cannot be rebuilt by "
            f"simclr_keras.export.load_encoder ({encoder.rebuild_error}); pass model_dir=RUN."
        )
    num_train = len(labelled.train_labels)
    settings = _optimizer_settings(config, num_train)
    result, _ = evaluation.finetune(
        encoder.backbone, labelled.train_examples, num_train, labelled.test_batches, labelled.num_classes,
        # The training views have the size the test images get from the run's augmenter.
        encoder.image_size,
        epochs=settings["epochs"], batch_size=settings["batch_size"], learning_rate=settings["learning_rate"],
        momentum=config.momentum, weight_decay=config.weight_decay, seed=config.seed,
        preprocess=encoder.preprocess, verbose=2, projection_head=encoder.projection_head,
        head_layer=config.head_layer, crop_sampler=encoder.crop_sampler, optimizer=config.optimizer,
    )  # fmt: skip
    settings.update(crop_sampler=encoder.crop_sampler)
    # Fine-tuning returns only the scores: its test labels are read again (in the same order) if needed.
    return _trained_outcome("finetune", result, settings, num_train, None)


PROTOCOL_STEPS = {"knn": _knn, "linear": _linear, "finetune": _finetune}


# --------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------


def _results(config, encoder, image_size, labelled, outcome, started):
    """The results JSON: accuracies and counts, then every setting used, then the seconds taken."""
    source_settings = {"model_dir": config.model_dir, "encoder": config.encoder if config.model_dir else encoder.source}
    settings = {
        "dataset": config.dataset,
        "train_split": config.train_split,
        "eval_split": config.eval_split,
        "max_train_examples": config.max_train_examples,
        "label_fraction": config.label_fraction,
        "seed": config.seed,
        **source_settings,
        "random_init": config.random_init,
        "head_layer": config.head_layer,
        **({"checkpoint": encoder.checkpoint} if config.model_dir else {}),
        "image_size": image_size,
        **outcome.settings,
    }
    return {
        "protocol": config.protocol,
        "top1": outcome.result.top1,
        "top5": outcome.result.top5,
        "num_train": int(outcome.num_train),
        "num_test": int(outcome.result.scores.shape[0]),
        "num_classes": labelled.num_classes,
        **settings,
        "seconds": round(time.time() - started, 1),
    }


def _write_results(config, results):
    if not config.output:
        return
    try:
        os.makedirs(os.path.dirname(os.path.abspath(config.output)), exist_ok=True)
        with open(config.output, "w", encoding="utf-8") as file:
            json.dump(results, file, indent=2)
    except OSError as error:
        raise EvaluationError(
            f"output={config.output} cannot be written ({error.strerror}); pass a writable file path."
        ) from None


def _confusion_matrix_path(config):
    """config.confusion_matrix; by default, with an output, <output stem>_confusion.png; "" for none."""
    if config.confusion_matrix is None and config.output:
        return os.path.splitext(config.output)[0] + "_confusion.png"
    return config.confusion_matrix or None


def _write_confusion_matrix(path, config, encoder, labelled, outcome):
    """Writes the PNG of the test confusion matrix (predictions: each row's highest score); a failure only warns.

    The results are already written as JSON, so a picture that cannot be drawn must not turn the
    evaluation into a failure.
    """
    try:
        from simclr_keras import plots

        # argmax takes the lower class on ties, as top-1 accuracy does (evaluation.top_k_accuracy).
        predictions = np.argmax(np.asarray(outcome.result.scores), axis=1)
        dataset = config.dataset
        if dataset.startswith("folder:"):  # a long absolute path would run off the picture
            dataset = "folder:" + os.path.basename(os.path.normpath(dataset[len("folder:"):]))
        source = os.path.basename(os.path.normpath(encoder.source))  # the run or version folder's name
        random_init = "random-init " if config.random_init else ""
        title = f"{outcome.description} of {random_init}{source}\n{dataset}:{config.eval_split}"
        labels = outcome.test_labels
        if labels is None:
            labels = evaluation.example_labels(labelled.test_examples)
        plots.save_confusion_matrix(labels, predictions, labelled.num_classes, path, labelled.class_names, title)
    except Exception as error:  # matplotlib, fonts, an unwritable path
        print(f"warning: --confusion_matrix={path} was not written ({type(error).__name__}: {error})", file=sys.stderr)
