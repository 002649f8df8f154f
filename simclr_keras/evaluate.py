"""Evaluate a pretrained encoder from the command line: kNN, linear evaluation or fine-tuning.

    python -m simclr_keras.evaluate --protocol=knn --model_dir=runs/cifar10 \
        --dataset=folder:../shared/datasets/cifar10 --output=runs/cifar10/knn.json
    python -m simclr_keras.evaluate --protocol=linear --encoder=exports/cifar10/1 --dataset=cifar10 --data_dir=DIR
    python -m simclr_keras.evaluate --protocol=finetune --label_fraction=0.1 --model_dir=runs/cifar10 ...
    python -m simclr_keras.evaluate --protocol=knn --model_dir=runs/cifar10 --random_init ...  # the baseline

The encoder is a training run's latest checkpoint (--model_dir) or an exported encoder's SavedModel
(--encoder=EXPORT_DIR/<version>, whose serving_default signature gives the features; finetune rebuilds a
trainable encoder from it with simclr_keras.export.load_encoder). Features are those of unaugmented
images through the encoder in inference mode. Prints one line with top-1 and top-5 test accuracy; --output also writes
them, the example counts and every setting used, as JSON, and the test confusion matrix as
<output stem>_confusion.png (or --confusion_matrix=PATH). simclr_keras.evaluation documents the
protocols.
"""

import json
import os
import sys
import time
import types

from absl import app, flags, logging

from simclr_keras.cli import fail
from simclr_keras.cli import reject_positional_arguments
from simclr_keras.cli import warn_about_data

FLAGS = flags.FLAGS

PROTOCOLS = ("knn", "linear", "finetune")
# The keys of simclr_keras.evaluation.LINEAR_PROTOCOLS (kept here: flags are checked before TensorFlow loads).
LINEAR_PROTOCOLS = ("features", "official")

# Encoder
flags.DEFINE_string("protocol", "linear", "knn, linear or finetune.")
flags.DEFINE_string("model_dir", None, "Training run whose latest checkpoint is evaluated.")
flags.DEFINE_string("encoder", None, "Exported encoder, EXPORT_DIR/<version> (or EXPORT_DIR: its highest version).")
flags.DEFINE_bool("random_init", False, "Evaluate a randomly initialised encoder of --model_dir's architecture.")
# Data
flags.DEFINE_string("dataset", "cifar10", "cifar10, cifar100, stl10, imagenet2012 (TFDS) or folder:DIR.")
flags.DEFINE_string("data_dir", None, "TFDS data directory holding prepared datasets.")
flags.DEFINE_string("train_split", "train", "Labelled split the classifier (or kNN memory) is built from.")
flags.DEFINE_string("eval_split", "test", "Split the accuracy is measured on.")
flags.DEFINE_integer("max_train_examples", 0, "Use only the first N training images (class-balanced for folders); 0: all.")
flags.DEFINE_bool("strict_data", False, "Stop on an image-folder file that does not decode, instead of skipping it with a warning.")
flags.DEFINE_float("label_fraction", 1.0, "Class-balanced fraction of the training labels used, in (0, 1] (e.g. 0.01, 0.1).")
flags.DEFINE_integer("image_size", None, "Side images are loaded at; default: the run's (--model_dir) or the export's size.")
flags.DEFINE_integer("seed", 0, "Seed of the label subset, shuffling, augmentation and --random_init weights.")
# Protocols
flags.DEFINE_integer("knn_k", 200, "kNN: number of neighbours.")
flags.DEFINE_float("knn_temperature", 0.1, "kNN: temperature T of the votes exp(similarity / T).")
flags.DEFINE_integer("epochs", 0, "linear, finetune: epochs; 0: 100 (linear), 60 (finetune, fraction < 0.1) or 30.")
flags.DEFINE_integer("batch_size", 0, "linear, finetune: batch size B; 0: 512 (linear) or 256 (finetune).")
flags.DEFINE_float("learning_rate", 0.0, "linear, finetune: base rate, used as rate x B/256; 0: 0.1 (linear) or 0.05 (finetune).")
flags.DEFINE_float("momentum", 0.9, "linear, finetune: Nesterov momentum.")
flags.DEFINE_float("weight_decay", 0.0, "linear, finetune: L2 weight decay (BatchNorm and biases excluded).")
flags.DEFINE_string(
    "linear_protocol", "features",
    "linear: 'official' (google-research/simclr: raw features of crop-and-flip views, new every epoch) or 'features' "
    "(unaugmented features extracted once, standardised; fast). Sets the defaults of the next two flags.",
)  # fmt: skip
flags.DEFINE_bool("linear_augment", False, "linear: random crop + flip of the training images, features recomputed every epoch.")
flags.DEFINE_bool("standardize_features", True, "linear: standardise each feature with the training mean and std.")
flags.DEFINE_integer(
    "head_layer", 0, "Features from the projection head's K-th layer instead of h (SimCLR v2 ft_proj_selector; 0: h)."
)
# Outputs
flags.DEFINE_string("output", None, "Write the results as JSON to this file.")
flags.DEFINE_string(
    "confusion_matrix", None, "PNG of the test set's confusion matrix; default with --output: <output stem>_confusion.png; empty: none."
)
flags.DEFINE_integer("eval_batch_size", 500, "Batch size of feature extraction and testing.")


def _validate():
    if FLAGS.protocol not in PROTOCOLS:
        fail(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {FLAGS.protocol!r}.")
    if bool(FLAGS.encoder) == bool(FLAGS.model_dir):
        given = f"--encoder={FLAGS.encoder} and --model_dir={FLAGS.model_dir}" if FLAGS.encoder else "neither"
        fail(f"pass exactly one of --encoder=EXPORT_DIR/<version> and --model_dir=RUN, got {given}.")
    if FLAGS.random_init and not FLAGS.model_dir:
        fail(f"--random_init rebuilds --model_dir's architecture; it cannot be used with --encoder={FLAGS.encoder}.")
    if not 0.0 < FLAGS.label_fraction <= 1.0:
        fail(f"--label_fraction must be in (0, 1], got {FLAGS.label_fraction}.")
    if FLAGS.knn_k < 1:
        fail(f"--knn_k must be >= 1, got {FLAGS.knn_k}.")
    if not FLAGS.knn_temperature > 0:
        fail(f"--knn_temperature must be > 0, got {FLAGS.knn_temperature}.")
    for name in ("epochs", "batch_size", "learning_rate", "weight_decay", "max_train_examples", "seed"):
        if getattr(FLAGS, name) < 0:
            fail(f"--{name} must be >= 0, got {getattr(FLAGS, name)}.")
    if not 0.0 <= FLAGS.momentum < 1.0:
        fail(f"--momentum must be in [0, 1), got {FLAGS.momentum}.")
    if FLAGS.image_size is not None and FLAGS.image_size < 8:
        fail(f"--image_size must be >= 8, got {FLAGS.image_size}.")
    if FLAGS.eval_batch_size < 1:
        fail(f"--eval_batch_size must be >= 1, got {FLAGS.eval_batch_size}.")
    if FLAGS.linear_augment and FLAGS.protocol != "linear":
        fail(f"--linear_augment applies to --protocol=linear, got --protocol={FLAGS.protocol}.")
    if FLAGS.linear_protocol not in LINEAR_PROTOCOLS:
        fail(f"--linear_protocol must be one of {', '.join(LINEAR_PROTOCOLS)}, got {FLAGS.linear_protocol!r}.")
    if FLAGS.head_layer < 0:
        fail(f"--head_layer must be >= 0 (0: h, K: the projection head's K-th layer), got {FLAGS.head_layer}.")
    # --linear_protocol gives the defaults; --linear_augment and --standardize_features given explicitly win.
    if FLAGS.linear_protocol == "official":
        if not FLAGS["linear_augment"].present:
            FLAGS.linear_augment = FLAGS.protocol == "linear"
        if not FLAGS["standardize_features"].present:
            FLAGS.standardize_features = False


def _protocol_defaults():
    """(epochs, batch size, base learning rate) with 0 flags replaced by the protocol's defaults."""
    if FLAGS.protocol == "linear":
        defaults = (100, 512, 0.1)  # the official CIFAR-10 linear evaluation
    else:
        # SimCLR Appendix B.5: 60 epochs on 1% of the labels, 30 on 10%; lr 0.05 x B/256.
        defaults = (60 if FLAGS.label_fraction < 0.1 else 30, 256, 0.05)
    given = (FLAGS.epochs, FLAGS.batch_size, FLAGS.learning_rate)
    return tuple(value or default for value, default in zip(given, defaults))


def _load_model(model_dir, random_init):
    """The run's SimCLR model (latest checkpoint) or, with random_init, its architecture, freshly initialised."""
    import keras

    from simclr_keras import runs

    if not random_init:
        return runs.load_model(model_dir)
    # Rebuilding from the config without restoring gives the initialisation seeded by --seed.
    config_path = os.path.join(model_dir, runs.MODEL_CONFIG)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{model_dir} is not a training run: {runs.MODEL_CONFIG} is missing.")
    with open(config_path, encoding="utf-8") as file:
        return keras.saving.deserialize_keras_object(json.load(file))


def _rebuild_exported_encoder(path, head_layer=0):
    """(encoder, augmenter, projection head or None) of an export written by simclr_keras.export.

    `export.load_encoder` gives uint8 images -> h with the evaluation preprocessing inside; its parts
    are the bare encoder (float images in [0, 1] -> h), the run's augmenter and, with `head_layer`,
    the projection head. Returns (None, reason) when `path` cannot be rebuilt (e.g. a SavedModel
    written by other code).
    """
    import keras

    try:
        from simclr_keras import export
        from simclr_keras.heads import ProjectionHead

        loaded = export.load_encoder(path, head_layer)
        preprocessing = [layer for layer in loaded.layers if isinstance(layer, export.EvaluationPreprocessing)]
        encoders = [layer for layer in loaded.layers if isinstance(layer, keras.Model)]
        heads = [layer for layer in loaded.layers if isinstance(layer, ProjectionHead)]
        if len(preprocessing) != 1 or len(encoders) != 1:
            return None, "its Keras model is not preprocessing followed by an encoder"
    except Exception as error:  # load_encoder raises several types for exports it did not write
        return None, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return (encoders[0], preprocessing[0].augmenter, heads[0] if heads else None), None


def _write_confusion_matrix(path, labels, scores, num_classes, class_names, description, source):
    """Writes the PNG of the test confusion matrix (predictions: each row's highest score); a failure only warns.

    The results are already printed and written as JSON, so a picture that cannot be drawn must not
    turn the command into a failure.
    """
    import numpy as np

    try:
        from simclr_keras import plots

        # argmax takes the lower class on ties, as top-1 accuracy does (evaluation.top_k_accuracy).
        predictions = np.argmax(np.asarray(scores), axis=1)
        dataset = FLAGS.dataset
        if dataset.startswith("folder:"):  # a long absolute path would run off the picture
            dataset = "folder:" + os.path.basename(os.path.normpath(dataset[len("folder:"):]))
        source = os.path.basename(os.path.normpath(source))  # the run or version folder's name
        title = f"{description} of {'random-init ' if FLAGS.random_init else ''}{source}\n{dataset}:{FLAGS.eval_split}"
        plots.save_confusion_matrix(labels, predictions, num_classes, path, class_names, title)
    except Exception as error:  # matplotlib, fonts, an unwritable path
        print(f"warning: --confusion_matrix={path} was not written ({type(error).__name__}: {error})", file=sys.stderr)


def run_evaluation():
    # Heavy imports after flag validation, so that --help and flag errors are instant.
    import keras
    import tensorflow as tf

    from simclr_keras import data, evaluation, optimizers, runs

    try:  # before the encoder loads: a folder listing is cheap, decoding comes later
        data.check_dataset(FLAGS.dataset, [FLAGS.train_split, FLAGS.eval_split])
    except data.DatasetNotFoundError as error:
        fail(str(error))
    started = time.time()
    keras.utils.set_random_seed(FLAGS.seed)
    settings = {
        "protocol": FLAGS.protocol,
        "dataset": FLAGS.dataset,
        "train_split": FLAGS.train_split,
        "eval_split": FLAGS.eval_split,
        "max_train_examples": FLAGS.max_train_examples,
        "label_fraction": FLAGS.label_fraction,
        "seed": FLAGS.seed,
        "model_dir": FLAGS.model_dir,
        "encoder": FLAGS.encoder,
        "random_init": FLAGS.random_init,
        "head_layer": FLAGS.head_layer,
    }

    # The encoder, as a feature function on uint8 images.
    model = None
    if FLAGS.model_dir:
        try:
            model = _load_model(FLAGS.model_dir, FLAGS.random_init)
        except FileNotFoundError as error:
            fail(f"--model_dir={FLAGS.model_dir}: {error}")
        image_size = FLAGS.image_size or model.augmenter.output_height
        try:
            model.projection_head._check_head_layer(FLAGS.head_layer)
        except ValueError as error:
            fail(f"--head_layer={FLAGS.head_layer}: {error}")
        feature_function = evaluation.feature_function_from_model(model, FLAGS.head_layer)
        checkpoint = None
        if not FLAGS.random_init:
            checkpoint = tf.train.latest_checkpoint(os.path.join(FLAGS.model_dir, runs.CHECKPOINTS))
        settings["checkpoint"] = checkpoint
    else:
        from simclr_keras import export

        try:
            # EXPORT_DIR itself stands for its highest version.
            encoder_path = export.resolve_version_dir(FLAGS.encoder)
        except FileNotFoundError as error:
            fail(f"--encoder={FLAGS.encoder}: {error}")
        settings["encoder"] = encoder_path
        output = export.head_layer_output_name(FLAGS.head_layer) if FLAGS.head_layer else export.EMBEDDINGS
        try:
            feature_function, exported_size = evaluation.feature_function_from_saved_model(encoder_path, output)
        except ValueError as error:
            if not FLAGS.head_layer:
                fail(f"--encoder={FLAGS.encoder}: {error}")
            # No head_layer_K output: the features come from the rebuilt Keras encoder and head below.
            feature_function, exported_size = None, None
        except Exception as error:  # tf.saved_model.load raises several types for a path that is no SavedModel
            fail(
                f"--encoder={FLAGS.encoder} is not an exported encoder ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}); pass EXPORT_DIR/<version> written by "
                "simclr_keras.export."
            )
        if FLAGS.image_size and exported_size and FLAGS.image_size != exported_size:
            fail(f"--image_size={FLAGS.image_size} differs from the {exported_size} px the exported encoder takes.")
        image_size = FLAGS.image_size or exported_size
        if FLAGS.protocol == "finetune" or not image_size or feature_function is None:
            # Fine-tuning needs trainable weights, and a signature taking any size (which resizes
            # inside) leaves the training size to the export's Keras configs.
            parts, reason = _rebuild_exported_encoder(encoder_path, FLAGS.head_layer)
            if parts is None and FLAGS.protocol == "finetune":
                fail(
                    f"--protocol=finetune needs trainable weights, and --encoder={FLAGS.encoder} cannot be rebuilt "
                    f"by simclr_keras.export.load_encoder ({reason}); pass --model_dir=RUN."
                )
            if parts is None and feature_function is None:
                fail(f"--head_layer={FLAGS.head_layer}: --encoder={FLAGS.encoder} has no head_layer_{FLAGS.head_layer} "
                     f"output and cannot be rebuilt with its projection head ({reason}).")  # fmt: skip
            if parts is None:
                fail(f"--encoder={FLAGS.encoder} accepts any image size; pass --image_size (the pretraining size).")
            model = types.SimpleNamespace(encoder=parts[0], augmenter=parts[1], projection_head=parts[2])
            image_size = image_size or model.augmenter.output_height
            if feature_function is None:
                feature_function = evaluation.feature_function_from_model(model, FLAGS.head_layer)
    settings["image_size"] = image_size

    try:
        train_examples, train_info = data.load_images(
            FLAGS.dataset, FLAGS.train_split, image_size, FLAGS.data_dir, FLAGS.max_train_examples, FLAGS.strict_data
        )
        test_examples, test_info = data.load_images(
            FLAGS.dataset, FLAGS.eval_split, image_size, FLAGS.data_dir, strict=FLAGS.strict_data
        )
    except data.DatasetNotFoundError as error:  # InvalidImageError (--strict_data) included
        fail(str(error))
    warn_about_data(FLAGS.dataset, FLAGS.train_split, train_info)
    warn_about_data(FLAGS.dataset, FLAGS.eval_split, test_info)
    if not train_info.num_classes:
        fail(f"--train_split={FLAGS.train_split} of --dataset={FLAGS.dataset} has no labels.")
    if not test_info.num_classes:
        fail(f"--eval_split={FLAGS.eval_split} of --dataset={FLAGS.dataset} has no labels.")
    num_classes = train_info.num_classes
    # Unlabelled images (label -1, e.g. a folder's unlabeled/) take no part in any protocol.
    test_examples = test_examples.filter(lambda image, label: label >= 0)
    test_batches = data.evaluation_batches(test_examples, test_info, FLAGS.eval_batch_size, image_size)

    # The labelled training examples: all of them, or a class-balanced fraction.
    needs_labels_first = FLAGS.label_fraction < 1.0 or FLAGS.protocol == "finetune" or FLAGS.linear_augment
    if needs_labels_first:
        all_labels = evaluation.example_labels(train_examples)
        indices = evaluation.label_fraction_subset(all_labels, FLAGS.label_fraction, FLAGS.seed)
        if len(indices) == 0:
            fail(f"--train_split={FLAGS.train_split} of --dataset={FLAGS.dataset} has no labelled images.")
        train_examples = evaluation.select_examples(train_examples, indices, len(all_labels))
        train_labels = all_labels[indices]
    else:
        train_examples = train_examples.filter(lambda image, label: label >= 0)
        train_labels = None  # known after feature extraction
    train_batches = data.evaluation_batches(train_examples, train_info, FLAGS.eval_batch_size, image_size)

    epochs, batch_size, base_learning_rate = _protocol_defaults()
    # Linear evaluation and fine-tuning crop as pretraining did (the official sampler otherwise).
    crop_sampler = getattr(getattr(model, "augmenter", None), "crop_sampler", "tensorflow")
    if FLAGS.protocol == "knn":
        train_features, train_labels = evaluation.extract_features(feature_function, train_batches)
        test_features, test_labels = evaluation.extract_features(feature_function, test_batches)
        _, scores = evaluation.knn_classify(
            train_features, train_labels, test_features, FLAGS.knn_k, FLAGS.knn_temperature, num_classes
        )
        result = evaluation.ClassificationResult(
            top1=evaluation.top_k_accuracy(scores, test_labels, 1),
            top5=evaluation.top_k_accuracy(scores, test_labels, 5),
            scores=scores,
        )
        settings.update(
            knn_k=FLAGS.knn_k, knn_k_used=min(FLAGS.knn_k, len(train_labels)), knn_temperature=FLAGS.knn_temperature
        )
        num_train, num_test = len(train_labels), len(test_labels)
        description = f"knn (k={settings['knn_k_used']}, T={FLAGS.knn_temperature:g})"
    else:
        if FLAGS.protocol == "linear":
            if FLAGS.linear_augment:
                train_features = evaluation.augmented_feature_epochs(
                    feature_function, train_examples, len(train_labels), image_size, FLAGS.eval_batch_size, FLAGS.seed,
                    crop_sampler=crop_sampler,
                )  # fmt: skip
            else:
                train_features, train_labels = evaluation.extract_features(feature_function, train_batches)
            test_features, test_labels = evaluation.extract_features(feature_function, test_batches)
        num_train = len(train_labels)
        # A batch larger than the training set is the whole set; the rate is scaled by the batch used.
        batch_size = min(batch_size, num_train)
        learning_rate = optimizers.scale_learning_rate(base_learning_rate, batch_size, "linear")
        settings.update(
            epochs=epochs,
            batch_size=batch_size,
            base_learning_rate=base_learning_rate,
            learning_rate=learning_rate,
            momentum=FLAGS.momentum,
            nesterov=True,
            weight_decay=FLAGS.weight_decay,
        )
        if FLAGS.protocol == "linear":
            result = evaluation.linear_evaluation(
                train_features,
                train_labels,
                test_features,
                test_labels,
                num_classes,
                epochs=epochs,
                batch_size=batch_size,
                learning_rate=learning_rate,
                momentum=FLAGS.momentum,
                weight_decay=FLAGS.weight_decay,
                standardize=FLAGS.standardize_features,
                seed=FLAGS.seed,
                verbose=2,
            )
            settings.update(
                linear_protocol=evaluation.linear_protocol_name(FLAGS.linear_augment, FLAGS.standardize_features),
                linear_augment=FLAGS.linear_augment,
                standardize_features=FLAGS.standardize_features,
                crop_sampler=crop_sampler if FLAGS.linear_augment else None,
            )
        else:
            result, _ = evaluation.finetune(
                model.encoder,
                train_examples,
                num_train,
                test_batches,
                num_classes,
                # The training views have the size the test images get from the run's augmenter.
                model.augmenter.output_height,
                epochs=epochs,
                batch_size=batch_size,
                learning_rate=learning_rate,
                momentum=FLAGS.momentum,
                weight_decay=FLAGS.weight_decay,
                seed=FLAGS.seed,
                preprocess=lambda images: model.augmenter(images, training=False),
                verbose=2,
                projection_head=getattr(model, "projection_head", None),
                head_layer=FLAGS.head_layer,
                crop_sampler=crop_sampler,
            )
            settings.update(crop_sampler=crop_sampler)
        num_test = int(result.scores.shape[0])
        name = FLAGS.protocol
        if FLAGS.protocol == "linear":
            name = f"linear[{settings['linear_protocol']}]"
        description = f"{name} ({epochs} epochs, batch {batch_size}, lr {learning_rate:g})"
        settings.update(train_loss=result.train_loss, train_top1=result.train_top1)

    results = {
        "protocol": FLAGS.protocol,
        "top1": result.top1,
        "top5": result.top5,
        "num_train": int(num_train),
        "num_test": int(num_test),
        "num_classes": num_classes,
        **{key: value for key, value in settings.items() if key != "protocol"},
        "seconds": round(time.time() - started, 1),
    }
    if FLAGS.output:
        try:
            directory = os.path.dirname(os.path.abspath(FLAGS.output))
            os.makedirs(directory, exist_ok=True)
            with open(FLAGS.output, "w", encoding="utf-8") as file:
                json.dump(results, file, indent=2)
        except OSError as error:
            fail(f"--output={FLAGS.output} cannot be written ({error.strerror}); pass a writable file path.")
    source = ("random-init " if FLAGS.random_init else "") + (FLAGS.model_dir or settings["encoder"])
    confusion_path = FLAGS.confusion_matrix
    if confusion_path is None and FLAGS.output:
        confusion_path = os.path.splitext(FLAGS.output)[0] + "_confusion.png"
    if confusion_path:
        # Fine-tuning returns only the scores; its test labels are read again, in the same order.
        labels = evaluation.example_labels(test_examples) if FLAGS.protocol == "finetune" else test_labels
        _write_confusion_matrix(
            confusion_path, labels, result.scores, num_classes, test_info.class_names, description,
            FLAGS.model_dir or settings["encoder"],
        )  # fmt: skip
    if FLAGS.head_layer:
        description += f" on head layer {FLAGS.head_layer}"
    print(
        f"{description} of {source} on {FLAGS.dataset}:{FLAGS.eval_split}: top-1 {result.top1:.4f}, "
        f"top-5 {result.top5:.4f} ({num_train} train, {num_test} test images, {num_classes} classes)"
    )


def main(argv):
    logging.set_verbosity(logging.WARNING)  # TensorFlow's INFO lines would bury the result
    reject_positional_arguments(argv)
    _validate()
    run_evaluation()


if __name__ == "__main__":
    app.run(main)
