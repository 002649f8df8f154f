"""Evaluation protocols of a pretrained encoder: kNN, linear evaluation and semi-supervised fine-tuning.

The three protocols of the SimCLR paper (Chen et al., ICML 2020, arXiv:2002.05709) and its usual
companion:

- `knn_classify`: weighted cosine k-nearest-neighbour vote on frozen features (Wu et al., "Unsupervised
  Feature Learning via Non-Parametric Instance Discrimination", CVPR 2018): the k most
  similar training features vote for their class with weight exp(similarity / temperature).
- `linear_evaluation`: a linear classifier trained on frozen features (the paper's main protocol;
  the official google-research/simclr CIFAR-10 recipe: Nesterov momentum SGD, base rate 0.1 x B/256 at
  B = 512, cosine decay without warm-up, 100 epochs, no weight decay, zero-initialised classifier).
- `reference_linear_evaluation`: the linear evaluation of the HCL and debiased (DCL) reference code
  (their linear.py), whose numbers those papers publish: the frozen encoder in training mode (BatchNorm
  on batch statistics) on one pretraining-augmented view per image and epoch, torch's Adam at 1e-3 with
  L2 1e-6, batch 512, 100 epochs (`--linear_protocol=hcl_dcl`).
- `finetune`: the whole encoder plus a linear head trained on a class-balanced fraction of the labels
  (`label_fraction_subset`), as in the paper's semi-supervised results (Appendix B.5: Nesterov momentum SGD,
  learning rate 0.05 x B/256, no warm-up, no regularisation, random crop and flip only).

Encoders enter as *feature functions*: callables mapping a batch of uint8 images [B, S, S, 3] to
features [B, D]. `feature_function_from_model` makes one from a SimCLR model (its evaluation
preprocessing, then its encoder in inference mode), `feature_function_from_saved_model` from an
exported encoder's `serving_default` signature; `simclr_keras.Encoder` (simclr_keras/encoder.py) holds
one with what evaluation needs around it. Views cropped here (the official linear protocol's
`augmented_feature_epochs`) skip the evaluation preprocessing: `feature_function_of_views`.
Data enter as `tf.data` datasets of (uint8 image, int64 label), the format of
`simclr_keras.data.load_images`. The whole evaluation as one call:
`simclr_keras.evaluate_encoder` (simclr_keras/eval_run.py).
"""

import dataclasses
import math

import keras
import numpy as np
import tensorflow as tf

from simclr_keras import augment, optimizers

# Bounded memory for kNN: a block of similarities is at most this many test rows by train columns
# (1024 x 16384 float32 = 64 MiB), whatever the sizes of the two sets.
DEFAULT_TEST_CHUNK_SIZE = 1024
DEFAULT_TRAIN_CHUNK_SIZE = 16384
# Keep images in memory (tf.data cache) for multi-epoch protocols when they take less than this.
DEFAULT_CACHE_LIMIT_BYTES = 4 * 1024**3
# Linear evaluation variants: what the classifier is trained on.
#   official: as google-research/simclr (train_mode=finetune, fine_tune_after_block=4): the frozen
#     encoder's raw features of random crop-and-flip views, new views every epoch.
#   features: features of the unaugmented images, extracted once and standardised (fast).
LINEAR_PROTOCOLS = {
    "official": {"augment": True, "standardize": False},
    "features": {"augment": False, "standardize": True},
}


def linear_protocol_name(augment, standardize):
    """The name of the linear evaluation variant of these settings, for results and log lines."""
    for name, settings in LINEAR_PROTOCOLS.items():
        if settings == {"augment": bool(augment), "standardize": bool(standardize)}:
            return name
    return f"custom (augment={bool(augment)}, standardize={bool(standardize)})"


@dataclasses.dataclass
class ClassificationResult:
    """What a protocol measured on the test set.

    top1, top5: accuracies in [0, 1] (top5 is top-min(5, C)).
    scores: float32 [N_test, C] class scores (kNN: vote shares; linear and fine-tuning: logits).
    train_loss, train_top1: the last training epoch's mean cross-entropy and accuracy (None for kNN).
    """

    top1: float
    top5: float
    scores: np.ndarray
    train_loss: float | None = None
    train_top1: float | None = None


# --------------------------------------------------------------------------------------
# Accuracy and label subsets
# --------------------------------------------------------------------------------------


def top_k_accuracy(scores, labels, k):
    """Fraction of rows whose true label is among the k highest scores.

    Ties between scores are broken towards the lower class index, as `np.argmax` does, so that
    top-1 accuracy equals the accuracy of `argmax(scores)`. k larger than the number of classes
    counts every row as correct.

    Args:
      scores: [N, C] class scores (logits, probabilities or votes).
      labels: [N] integer labels in [0, C).
      k: positive integer.
    """
    scores = np.asarray(scores)
    labels = np.asarray(labels).reshape(-1)
    if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"scores must be [N, C] with N = len(labels) = {labels.shape[0]}, got {scores.shape}.")
    if scores.shape[0] == 0:
        raise ValueError("top_k_accuracy needs at least one example.")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    # A stable sort of -scores keeps equal scores in class order.
    top_classes = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # [N, min(k, C)]
    return float(np.mean(np.any(top_classes == labels[:, None], axis=1)))


def label_fraction_subset(labels, fraction, seed=0):
    """Indices of a class-balanced random subset holding `fraction` of each class's examples.

    Each class c with n_c examples keeps max(1, round(fraction * n_c)) of them (halves rounded up),
    drawn without replacement by a generator seeded with (seed, c): the same seed gives the same
    subset, and each class's draw does not depend on the other classes. Negative labels
    (unlabelled examples) are never selected.

    Args:
      labels: [N] integer labels.
      fraction: in (0, 1]; 1 keeps every labelled example.
      seed: non-negative integer.

    Returns:
      int64 [M] indices into `labels`, sorted ascending.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    labels = np.asarray(labels).reshape(-1)
    selected = []
    for class_index in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == class_index)
        count = max(1, int(math.floor(fraction * len(members) + 0.5)))
        generator = np.random.default_rng([int(seed), int(class_index)])
        selected.append(generator.choice(members, size=count, replace=False))
    if not selected:
        return np.zeros([0], np.int64)
    return np.sort(np.concatenate(selected)).astype(np.int64)


# --------------------------------------------------------------------------------------
# kNN
# --------------------------------------------------------------------------------------


def _nearest_neighbours(test_block, train_features, k, train_chunk_size):
    """The k largest cosine similarities of each row of `test_block` to the (normalised) train set.

    Walks the train set in chunks and keeps a running top-k, so memory is [rows, k + chunk].
    Returns (similarities [rows, k] descending, train indices [rows, k]). Equal similarities keep the
    lower train index first, as one `tf.math.top_k` over the whole row would.
    """
    rows = tf.shape(test_block)[0]
    best_similarities = tf.zeros([rows, 0], tf.float32)
    best_indices = tf.zeros([rows, 0], tf.int64)
    num_train = int(train_features.shape[0])
    for start in range(0, num_train, train_chunk_size):
        chunk = train_features[start:start + train_chunk_size]
        similarities = tf.matmul(test_block, chunk, transpose_b=True)  # [rows, chunk]
        chunk_indices = tf.range(start, start + int(chunk.shape[0]), dtype=tf.int64)
        # The running best come first: they hold lower train indices, so top_k's tie rule (lower
        # position first) keeps ties in train-index order across chunks.
        candidates = tf.concat([best_similarities, similarities], axis=1)
        candidate_indices = tf.concat(
            [best_indices, tf.broadcast_to(chunk_indices[None], tf.shape(similarities, out_type=tf.int32))], axis=1
        )
        best_similarities, positions = tf.math.top_k(candidates, k=min(k, int(candidates.shape[1])))
        best_indices = tf.gather(candidate_indices, positions, batch_dims=1)
    return best_similarities, best_indices


def knn_classify(
    train_features,
    train_labels,
    test_features,
    k=200,
    temperature=0.1,
    num_classes=None,
    test_chunk_size=DEFAULT_TEST_CHUNK_SIZE,
    train_chunk_size=DEFAULT_TRAIN_CHUNK_SIZE,
):
    """Weighted cosine kNN classification (Wu et al. 2018, InstDisc; the protocol lightly also uses).

    Features are L2-normalised; each test feature takes its k most similar training features, with
    cosine similarities s_i, and gives class c the score sum over neighbours of class c of
    exp(s_i / temperature). Similarities are computed in [test_chunk_size, train_chunk_size] blocks,
    so memory stays bounded for any set sizes; the result does not depend on the chunk sizes.

    The returned scores are each row's votes divided by their sum (vote shares): the same ranking as
    the raw sums, without their overflow at small temperatures (exp(1 / 0.01) overflows float32).

    Args:
      train_features: [N_train, D] float features.
      train_labels: [N_train] integer labels in [0, num_classes).
      test_features: [N_test, D] float features.
      k: number of neighbours; more than N_train uses all of them.
      temperature: > 0.
      num_classes: number of classes C; None: max(train_labels) + 1.

    Returns:
      (predictions int64 [N_test], scores float32 [N_test, C]).
    """
    train_labels = np.asarray(train_labels, np.int64).reshape(-1)
    train_features = np.asarray(train_features, np.float32)
    test_features = np.asarray(test_features, np.float32)
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"features must be [N, D] with the same D, got {train_features.shape} and {test_features.shape}."
        )
    if train_features.shape[0] != train_labels.shape[0] or train_labels.shape[0] == 0:
        raise ValueError(
            f"need one label per training feature and at least one, got {train_labels.shape[0]} labels for "
            f"{train_features.shape[0]} features."
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if train_labels.min() < 0:
        raise ValueError("train_labels must be >= 0; leave unlabelled examples out.")
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    if train_labels.max() >= num_classes:
        raise ValueError(f"train_labels must be < num_classes={num_classes}, found {train_labels.max()}.")
    k = min(int(k), train_features.shape[0])

    normalised_train = tf.math.l2_normalize(tf.constant(train_features), axis=1)  # [N_train, D]
    labels = tf.constant(train_labels)
    score_blocks = []
    for start in range(0, test_features.shape[0], test_chunk_size):
        block = tf.math.l2_normalize(tf.constant(test_features[start:start + test_chunk_size]), axis=1)
        similarities, indices = _nearest_neighbours(block, normalised_train, k, train_chunk_size)  # [rows, k]
        # Shifting by the row's largest similarity scales the row's votes by one constant.
        weights = tf.exp((similarities - similarities[:, :1]) / temperature)  # [rows, k]
        neighbour_labels = tf.gather(labels, indices)  # [rows, k]
        rows = tf.shape(block, out_type=tf.int64)[0]
        # Sum the weights per (row, class) without a [rows, k, C] one-hot.
        segment = tf.range(rows)[:, None] * num_classes + neighbour_labels
        votes = tf.math.unsorted_segment_sum(
            tf.reshape(weights, [-1]), tf.reshape(segment, [-1]), rows * num_classes
        )
        votes = tf.reshape(votes, [-1, num_classes])  # [rows, C]
        score_blocks.append((votes / tf.reduce_sum(votes, axis=1, keepdims=True)).numpy())
    if score_blocks:
        scores = np.concatenate(score_blocks)
    else:
        scores = np.zeros([0, num_classes], np.float32)
    return np.argmax(scores, axis=1).astype(np.int64), scores


# --------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------


def feature_function_from_model(model, head_layer=0):
    """Feature function of a SimCLR model: uint8 images [B, H, W, 3] (or a padded batch) -> h [B, D].

    Applies the model's evaluation preprocessing (`augmenter(images, training=False)`: centre crop,
    resize to the training size, scale to [0, 1]) and its encoder in inference mode (BatchNorm
    moving statistics). With `head_layer` K > 0 the features are the output of the K-th layer of
    the projection head, also in inference mode (SimCLR v2's `ft_proj_selector`).
    """

    @tf.function(reduce_retracing=True)
    def features(images):
        views = model.augmenter(images, training=False)
        head = model.projection_head if head_layer else None  # anything with encoder and augmenter works for h
        return _features_of_views(model.encoder, head, head_layer, views)

    return features


def feature_function_of_views(encoder, projection_head=None, head_layer=0):
    """Feature function of views already preprocessed: float32 [B, S, S, 3] in [0, 1] -> h [B, D].

    For views cropped elsewhere (the official linear protocol's random crops): no evaluation
    preprocessing is applied, so nothing is cropped twice. Encoder (and with `head_layer` K > 0,
    the projection head up to its K-th layer) in inference mode.
    """

    @tf.function(reduce_retracing=True)
    def features(views):
        return _features_of_views(encoder, projection_head, head_layer, views)

    return features


def feature_function_of_preprocessed(preprocess, view_feature_function):
    """Feature function of uint8 images: `preprocess` (images -> views), then `view_feature_function`, traced once."""

    @tf.function(reduce_retracing=True)
    def features(images):
        return view_feature_function(preprocess(images))

    return features


def feature_function_of_uint8_views(feature_function):
    """Feature function of float views [B, S, S, 3] in [0, 1] from one of uint8 images (an export's
    signature, whose own preprocessing then applies); the rounding is < 0.5 / 255."""
    return lambda views: feature_function(tf.cast(tf.round(views * 255.0), tf.uint8))


def _features_of_views(encoder, projection_head, head_layer, views, training=False):
    representation = encoder(views, training=training)  # (B, D)
    if not head_layer:
        return representation
    return projection_head(representation, training=training, head_layer=head_layer)


def feature_function_from_saved_model(path, output="embeddings"):
    """Feature function of an exported encoder: its `serving_default` signature, uint8 `images` in,
    `output` out: `embeddings` (h), or `head_layer_K` of an export written with `head_layer=K`.

    Returns (feature function, image size or None): the size is the side the signature fixes, None
    when it accepts any size. Raises ValueError naming what is missing when `path` holds a SavedModel
    without such a signature, or whose `images` are not uint8 [batch, height, width, 3];
    tf.saved_model.load's own errors when it holds none.
    """
    loaded = tf.saved_model.load(path)
    signature = loaded.signatures.get("serving_default") if hasattr(loaded, "signatures") else None
    if signature is None:
        raise ValueError(f"{path} has no serving_default signature.")
    _, input_specs = signature.structured_input_signature
    if "images" not in input_specs:
        raise ValueError(f"{path}: serving_default takes {sorted(input_specs)}, not `images`.")
    if output not in signature.structured_outputs:
        raise ValueError(f"{path}: serving_default returns {sorted(signature.structured_outputs)}, not `{output}`.")
    input_spec = input_specs["images"]
    shape = input_spec.shape
    # Images are fed as they are decoded: uint8 [batch, height, width, 3], values 0-255. Casting them
    # to another input type would silently change their scale (e.g. floats expected in [0, 1]).
    if input_spec.dtype != tf.uint8 or shape.rank not in (None, 4) or (shape.rank == 4 and shape[-1] not in (None, 3)):
        raise ValueError(
            f"{path}: serving_default takes `images` as {input_spec.dtype.name} {shape}, but evaluation feeds uint8 "
            "[batch, height, width, 3] images (the input simclr_keras.export writes)."
        )
    height, width = (shape.as_list() + [None] * 4)[1:3] if shape.rank is not None else (None, None)
    image_size = height if height is not None and height == width else None

    def features(images):
        # `loaded` is kept alive by this closure: the signature alone holds only weak references.
        return loaded.signatures["serving_default"](images=tf.cast(images, input_spec.dtype))[output]

    return features, image_size


def extract_features(feature_function, batches):
    """Runs `feature_function` over a dataset of (uint8 images, labels) batches.

    Returns (features float32 [N, D], labels int64 [N]) in dataset order.
    """
    feature_blocks, label_blocks = [], []
    for images, labels in batches:
        feature_blocks.append(np.asarray(feature_function(images), np.float32))
        label_blocks.append(np.asarray(labels, np.int64).reshape(-1))
    if not feature_blocks:
        raise ValueError("the dataset holds no images.")
    return np.concatenate(feature_blocks), np.concatenate(label_blocks)


def example_labels(examples):
    """The labels of an unbatched dataset of (image, label), int64 [N], in order (one pass)."""
    batches = examples.map(lambda image, label: label).batch(4096).prefetch(2)
    blocks = [np.asarray(block, np.int64) for block in batches.as_numpy_iterator()]
    return np.concatenate(blocks) if blocks else np.zeros([0], np.int64)


def select_examples(examples, indices, num_examples):
    """The elements of an unbatched dataset at positions `indices` (sorted), in dataset order."""
    keep = np.zeros([num_examples], bool)
    keep[np.asarray(indices, np.int64)] = True
    keep = tf.constant(keep)
    return examples.enumerate().filter(lambda position, example: keep[position]).map(
        lambda position, example: example
    )


def random_crop_and_flip(images, image_size, seed, crop_sampler="tensorflow"):
    """Random crop (area 8-100%, aspect ratio 3/4-4/3, bicubic resize) and horizontal flip.

    The only augmentation of the official linear evaluation and fine-tuning (`preprocess_for_train`
    without colour distortion), drawn per image from `seed` (int [2]), from the official code's
    crop sampler by default (`augment.sample_crop_boxes`).

    Args:
      images: uint8 [B, H, W, 3] in [0, 255] or float in [0, 1], or a padded batch
        {"images", "image_shapes"} of images of different sizes (`simclr_keras.data`).
      image_size: output side S.

    Returns float32 [B, S, S, 3] in [0, 1].
    """
    image_shapes = None
    if isinstance(images, dict):
        images, image_shapes = images[augment.PADDED_IMAGES], images[augment.IMAGE_SHAPES]
    if images.dtype.is_integer:
        images = tf.cast(images, tf.float32) / 255.0
    shape = tf.shape(images)
    heights, widths = (shape[1], shape[2]) if image_shapes is None else (image_shapes[:, 0], image_shapes[:, 1])
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=2))
    boxes = augment.sample_crop_boxes(crop_seed, shape[0], heights, widths, sampler=crop_sampler)
    views = augment.crop_and_resize(images, *boxes, image_size)
    flips = augment.stateless_uniform(flip_seed, [shape[0]]) < 0.5
    views = tf.where(flips[:, None, None, None], tf.reverse(views, axis=[2]), views)
    return tf.clip_by_value(views, 0.0, 1.0)


def _batch_seed(seed, epoch, batch_index):
    """A stateless seed [2] for one batch of one epoch."""
    base = tf.constant([int(seed), 0], tf.int64)
    return tf.random.experimental.stateless_fold_in(
        tf.random.experimental.stateless_fold_in(base, tf.cast(epoch, tf.int64)), tf.cast(batch_index, tf.int64)
    )


def _maybe_cache(examples, num_examples, image_size, cache_limit_bytes):
    """`examples.cache()` when its images (at their stored size where known) fit the limit."""
    image_spec = examples.element_spec[0]
    image_spec = image_spec["images"] if isinstance(image_spec, dict) else image_spec
    height, width = image_spec.shape[0], image_spec.shape[1]
    pixels = height * width if height is not None and width is not None else image_size * image_size
    if num_examples * pixels * 3 <= cache_limit_bytes:
        return examples.cache()
    return examples


def augmented_feature_epochs(
    feature_function,
    examples,
    num_examples,
    image_size,
    batch_size=500,
    seed=0,
    cache_limit_bytes=DEFAULT_CACHE_LIMIT_BYTES,
    crop_sampler="tensorflow",
):
    """Features of freshly augmented training images, one call per epoch.

    Returns a function epoch -> features float32 [N, D]: every image of `examples` (unbatched uint8
    image, label), in dataset order, through `random_crop_and_flip` to float views [B, S, S, 3] in
    [0, 1] (S = image_size) with seeds drawn from (seed, epoch, batch), then through
    `feature_function`, which takes those views as they are (`feature_function_of_views`: no
    second crop). For `linear_evaluation(train_features=...)`.
    """
    examples = _maybe_cache(examples, num_examples, image_size, cache_limit_bytes)

    def features_of_epoch(epoch):
        def augment_batch(batch_index, batch):
            images, labels = batch
            return random_crop_and_flip(images, image_size, _batch_seed(seed, epoch, batch_index), crop_sampler), labels

        batches = examples.batch(batch_size).enumerate().map(augment_batch, num_parallel_calls=tf.data.AUTOTUNE)
        features, _ = extract_features(feature_function, batches.prefetch(tf.data.AUTOTUNE))
        return features

    return features_of_epoch


# --------------------------------------------------------------------------------------
# Linear evaluation
# --------------------------------------------------------------------------------------


# The classifier layers of linear evaluation and fine-tuning: LARS keeps them out of its trust ratio,
# as the official code its `head_supervised`.
_CLASSIFIER_LAYERS = ("linear_classifier", "classifier")


def _momentum_optimizer(learning_rate, total_steps, momentum, weight_decay, optimizer="sgd"):
    """Nesterov momentum SGD ("sgd") or LARS ("lars", SimCLR v2's fine-tuning) with coupled L2 (BatchNorm
    and biases excluded), cosine decay, no warm-up."""
    schedule = optimizers.WarmupCosineDecay(learning_rate, total_steps, warmup_steps=0)
    exclude_layers = _CLASSIFIER_LAYERS if optimizer == "lars" else ()
    return optimizers.build_optimizer(
        optimizer, schedule, weight_decay=weight_decay, momentum=momentum, exclude_layers=exclude_layers
    )


def linear_evaluation(
    train_features,
    train_labels,
    test_features,
    test_labels,
    num_classes,
    epochs=100,
    batch_size=512,
    learning_rate=0.2,
    momentum=0.9,
    weight_decay=0.0,
    standardize=True,
    seed=0,
    verbose=0,
    optimizer="sgd",
):
    """Trains a linear classifier on frozen features and measures it on the test features.

    The official recipe: a zero-initialised Dense layer (logits = W h + b) trained with Nesterov
    momentum SGD and cross-entropy, learning rate decayed to 0 by a cosine over all steps without
    warm-up; the defaults are the official CIFAR-10 ones (batch 512, base rate 0.1 x 512/256 = 0.2,
    100 epochs, no weight decay).

    With `standardize`, each feature dimension is shifted and scaled by the training features'
    mean and standard deviation before the classifier (the test features with the same numbers).
    This is an affine map, so the classifier is still linear in h; it makes one learning rate work
    for encoders whose features differ in scale by orders of magnitude (a random encoder against a
    trained one), as the parameter-free BatchNorm of the online probe does (MAE, He et al. 2022).

    Args:
      train_features: float [N, D], or a function epoch -> [N, D] giving new features each epoch
        in the order of `train_labels` (augmented views, see `augmented_feature_epochs`); the
        standardisation then uses epoch 0's features.
      train_labels: int [N] in [0, num_classes).
      test_features: float [M, D]; test_labels: int [M].
      num_classes: number of classes C >= 2.
      learning_rate: peak learning rate (already batch-scaled).
      seed: seed of the shuffling of each epoch.
      optimizer: "sgd" (Nesterov momentum) or "lars" (the classifier keeps trust ratio 1: plain momentum).

    Returns:
      ClassificationResult with logits as scores.
    """
    train_labels = np.asarray(train_labels, np.int64).reshape(-1)
    test_labels = np.asarray(test_labels, np.int64).reshape(-1)
    features_of_epoch = train_features if callable(train_features) else None
    first_features = np.asarray(features_of_epoch(0) if features_of_epoch else train_features, np.float32)
    if first_features.shape[0] != train_labels.shape[0]:
        raise ValueError(f"{first_features.shape[0]} training features for {train_labels.shape[0]} labels.")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}.")
    num_train, dimension = first_features.shape
    normalise = _standardizer(first_features) if standardize else (lambda features: np.asarray(features, np.float32))
    classifier = _zero_initialised_classifier(
        keras.Input(shape=(dimension,), dtype="float32"), lambda inputs: inputs, num_classes, "linear_evaluation"
    )
    steps_per_epoch = math.ceil(num_train / batch_size)  # the last batch of an epoch may be smaller
    _compile(classifier, learning_rate, epochs * steps_per_epoch, momentum, weight_decay, optimizer)

    if features_of_epoch is None:
        dataset = tf.data.Dataset.from_tensor_slices((normalise(first_features), train_labels))
        dataset = dataset.shuffle(num_train, seed=seed, reshuffle_each_iteration=True).batch(batch_size)
        history = classifier.fit(dataset, epochs=epochs, shuffle=False, verbose=verbose)
    else:
        history = _fit_on_new_features_each_epoch(
            classifier, first_features, features_of_epoch, train_labels, normalise, epochs, batch_size, seed, verbose
        )

    test_logits = classifier.predict(normalise(test_features), batch_size=max(batch_size, 1024), verbose=0)
    return _result(test_logits, test_labels, history)


def _result(test_scores, test_labels, history):
    """The ClassificationResult of trained test scores, with the last epoch's training loss and accuracy."""
    return ClassificationResult(
        top1=top_k_accuracy(test_scores, test_labels, 1),
        top5=top_k_accuracy(test_scores, test_labels, 5),
        scores=test_scores,
        train_loss=float(history.history["loss"][-1]),
        train_top1=float(history.history["accuracy"][-1]),
    )


def _standardizer(features):
    """x -> (x - mean) / std per dimension, with the mean and std of `features` [N, D]."""
    mean = features.mean(axis=0)
    # Constant dimensions (dead ReLUs) stay at 0 instead of dividing by 0.
    scale = 1.0 / np.maximum(features.std(axis=0), 1e-6)
    return lambda values: ((np.asarray(values, np.float32) - mean) * scale).astype(np.float32)


def _zero_initialised_classifier(inputs, features_of, num_classes, name, layer_name="linear_classifier"):
    """keras.Model inputs -> logits [B, C]: features_of(inputs), then a zero-initialised Dense layer
    (the official code's zero_init_logits_layer)."""
    logits = keras.layers.Dense(num_classes, kernel_initializer="zeros", dtype="float32", name=layer_name)(
        features_of(inputs)
    )
    return keras.Model(inputs, logits, name=name)


def _compile(classifier, learning_rate, total_steps, momentum, weight_decay, optimizer="sgd"):
    classifier.compile(
        optimizer=_momentum_optimizer(learning_rate, total_steps, momentum, weight_decay, optimizer),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )


def _fit_on_new_features_each_epoch(
    classifier, first_features, features_of_epoch, train_labels, normalise, epochs, batch_size, seed, verbose
):
    """Trains one epoch at a time, on features_of_epoch(epoch) (epoch 0: first_features); the last History."""
    num_train = len(train_labels)
    for epoch in range(epochs):
        features = first_features if epoch == 0 else features_of_epoch(epoch)
        # A different shuffle each epoch: the dataset is rebuilt, so fold the epoch into its seed.
        dataset = tf.data.Dataset.from_tensor_slices((normalise(features), train_labels))
        dataset = dataset.shuffle(num_train, seed=_epoch_seed(seed, epoch)).batch(batch_size)
        history = _fit_one_epoch(classifier, dataset, epoch, epochs, verbose)
    return history


def _epoch_seed(seed, epoch):
    return seed * 100_003 + epoch


def _fit_one_epoch(classifier, dataset, epoch, epochs, verbose):
    """classifier.fit for epoch `epoch` only; its History. Keras would print "Epoch 1/1" every time, so
    one line per epoch is printed here instead."""
    history = classifier.fit(dataset, initial_epoch=epoch, epochs=epoch + 1, shuffle=False, verbose=0)
    if verbose:
        print(
            f"Epoch {epoch + 1}/{epochs}: loss {history.history['loss'][-1]:.4f}, "
            f"accuracy {history.history['accuracy'][-1]:.4f}",
            flush=True,
        )
    return history


# --------------------------------------------------------------------------------------
# The HCL and debiased references' linear evaluation (their linear.py)
# --------------------------------------------------------------------------------------


def training_mode_feature_epochs(
    encoder, examples, num_examples, augment, view_size, batch_size=512, seed=0, projection_head=None, head_layer=0,
    cache_limit_bytes=DEFAULT_CACHE_LIMIT_BYTES,
):  # fmt: skip
    """The training features of the references' linear.py: epoch -> (features float32 [N, D], labels int64 [N]).

    Each epoch shuffles `examples` (unbatched uint8 image, label) anew and cuts them into batches of
    `batch_size`, the last one smaller (torch's DataLoader(shuffle=True) without drop_last). Each
    image gets one view, `augment(images, seed)` (the pretraining augmentation: the references train
    on their `train_transform`), and the encoder runs in TRAINING mode: BatchNorm normalises with the
    batch's own statistics and moves its moving ones, as `net.train()` does to their frozen encoder,
    which no gradient reaches. Rows come batch after batch in the shuffled order: `batch_size`
    consecutive rows are the batch they were normalised in, which the classifier then trains on.
    `view_size` is the side of the views (for the cache decision).
    """
    examples = _maybe_cache(examples, num_examples, view_size, cache_limit_bytes)

    @tf.function(reduce_retracing=True)
    def features_of(views):
        return tf.stop_gradient(_features_of_views(encoder, projection_head, head_layer, views, training=True))

    def features_of_epoch(epoch):
        def augment_batch(batch_index, batch):
            images, labels = batch
            return augment(images, _batch_seed(seed, epoch, batch_index)), labels

        shuffled = examples.shuffle(num_examples, seed=_epoch_seed(seed, epoch))
        batches = shuffled.batch(batch_size).enumerate().map(augment_batch, num_parallel_calls=tf.data.AUTOTUNE)
        return extract_features(features_of, batches.prefetch(tf.data.AUTOTUNE))

    return features_of_epoch


def torch_linear_classifier(dimension, num_classes, learning_rate=1e-3, weight_decay=1e-6, seed=0):
    """The references' classifier, compiled: features [B, D] -> logits [B, C].

    `nn.Linear(D, C)` with its default initialisation (kernel and bias uniform in +-1/sqrt(D)) and
    `torch.optim.Adam(lr, weight_decay)`: the L2 term weight_decay * w joins the gradient of every
    parameter, the bias included (`AdamWithL2` without exclusions, epsilon 1e-8); a constant rate.
    """
    bound = 1.0 / math.sqrt(dimension)
    dense = keras.layers.Dense(
        num_classes, dtype="float32", name="linear_classifier",
        kernel_initializer=keras.initializers.RandomUniform(-bound, bound, seed=seed),
        bias_initializer=keras.initializers.RandomUniform(-bound, bound, seed=seed + 1),
    )  # fmt: skip
    inputs = keras.Input(shape=(dimension,), dtype="float32")
    classifier = keras.Model(inputs, dense(inputs), name="reference_linear_classifier")
    classifier.compile(
        optimizer=optimizers.AdamWithL2(learning_rate, epsilon=1e-8, weight_decay=float(weight_decay) or None),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    return classifier


def fit_on_feature_epochs(classifier, features_of_epoch, epochs, batch_size, verbose=0):
    """Trains `classifier` on features_of_epoch(epoch) -> (features, labels), in the order given and in
    batches of `batch_size` (those of `training_mode_feature_epochs`); returns the last History."""
    for epoch in range(epochs):
        dataset = tf.data.Dataset.from_tensor_slices(features_of_epoch(epoch)).batch(batch_size)
        history = _fit_one_epoch(classifier, dataset, epoch, epochs, verbose)
    return history


def reference_linear_evaluation(
    features_of_epoch, test_features, num_classes, epochs=100, batch_size=512, learning_rate=1e-3,
    weight_decay=1e-6, seed=0, verbose=0,
):  # fmt: skip
    """The HCL and debiased (DCL) references' linear evaluation, whose numbers their papers publish.

    Their linear.py: a linear classifier on h of the frozen encoder in training mode, on one view of
    the pretraining augmentation per image and epoch (`training_mode_feature_epochs`), trained by
    `torch_linear_classifier`'s Adam at 1e-3 with L2 1e-6, batch 512, 100 epochs; then tested with
    the encoder in inference mode, whose BatchNorm statistics the training epochs have moved.

    Args:
      features_of_epoch: epoch -> (features [N, D], labels [N]), `training_mode_feature_epochs`.
      test_features: () -> (features [M, D], labels [M]), called after training.

    Returns:
      ClassificationResult with logits as scores.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}.")
    first = features_of_epoch(0)
    classifier = torch_linear_classifier(first[0].shape[1], num_classes, learning_rate, weight_decay, seed)
    history = fit_on_feature_epochs(
        classifier, lambda epoch: first if epoch == 0 else features_of_epoch(epoch), epochs, batch_size, verbose
    )
    features, labels = test_features()
    test_logits = classifier.predict(features, batch_size=max(batch_size, 1024), verbose=0)
    return _result(test_logits, labels, history)


# --------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------


def _copy_of_head(projection_head, head_layer):
    """A trainable copy of a projection head whose layers after `head_layer` are frozen (unused)."""
    projection_head._check_head_layer(head_layer)  # its message names head_layer and the range (none without a head)
    copy = projection_head.__class__.from_config(projection_head.get_config())
    copy.build((None, int(projection_head.dense_layers[0].kernel.shape[0])))
    copy.set_weights(projection_head.get_weights())
    for layers in list(zip(copy.dense_layers, copy.batch_norm_layers))[head_layer:]:
        for layer in layers:
            if layer is not None:
                layer.trainable = False
    return copy


def finetune(
    encoder,
    train_examples,
    num_train,
    test_batches,
    num_classes,
    image_size,
    epochs=30,
    batch_size=256,
    learning_rate=0.05,
    momentum=0.9,
    weight_decay=0.0,
    seed=0,
    preprocess=None,
    cache_limit_bytes=DEFAULT_CACHE_LIMIT_BYTES,
    verbose=0,
    projection_head=None,
    head_layer=0,
    crop_sampler="tensorflow",
    optimizer="sgd",
):
    """Fine-tunes a copy of the encoder plus a linear head on labelled images; tests it.

    SimCLR Appendix B.5: every weight is trained (BatchNorm in training mode, batch statistics) with
    Nesterov momentum SGD and cross-entropy, no warm-up then cosine decay, no weight decay, on random
    crops and flips only (`random_crop_and_flip`). The head is zero-initialised, as the official
    code's `zero_init_logits_layer`. Every batch is full (BatchNorm statistics of a last batch of a
    few images would be degenerate): the examples are an endless stream, reshuffled every pass, and
    an epoch is ceil(num_train / batch_size) batches of it.

    Args:
      encoder: keras.Model, float images in [0, 1] -> h [B, D]. It is cloned; the original keeps
        its weights.
      train_examples: unbatched dataset of (uint8 image [S, S, 3], label), labelled only.
      num_train: number of elements of `train_examples`.
      test_batches: dataset of (uint8 images, labels) batches.
      num_classes: number of classes C.
      image_size: side S of the training views.
      batch_size: capped at `num_train`.
      learning_rate: peak learning rate (already batch-scaled).
      seed: seed of the order of the examples and of the crops and flips.
      preprocess: evaluation preprocessing, uint8 images -> float [0, 1] at the encoder's size
        (a SimCLR model's `augmenter(images, training=False)`); default: divide by 255.
      projection_head, head_layer: with K = head_layer > 0, the classifier sits on the output of
        the K-th layer of (a copy of) `projection_head`, whose first K layers are fine-tuned with
        the encoder: SimCLR v2's `ft_proj_selector` (it fine-tunes from the first layer of a
        3-layer head). 0: on h.
      crop_sampler: the training crops' sampler (`augment.sample_crop_boxes`).
      optimizer: "sgd" (Nesterov momentum, the v1 paper's) or "lars" (SimCLR v2's fine-tuning; batch-norm
        parameters, biases and the classifier keep trust ratio 1).

    Returns:
      (ClassificationResult with logits as scores, the fine-tuned classifier: a keras.Model from
      float images in [0, 1] to logits [B, C]).
    """
    if num_train < 1 or epochs < 1 or batch_size < 1:
        raise ValueError(f"num_train, epochs and batch_size must be >= 1, got {num_train}, {epochs}, {batch_size}.")
    batch_size = min(batch_size, num_train)
    # Batches come from an endless reshuffled stream and may straddle epochs, so an epoch is the
    # number of full batches that covers the set once (500 images at B = 256: 2 steps, not 1).
    steps_per_epoch = math.ceil(num_train / batch_size)

    classifier = _finetuned_classifier(encoder, num_classes, projection_head, head_layer)
    _compile(classifier, learning_rate, epochs * steps_per_epoch, momentum, weight_decay, optimizer)
    stream = _augmented_stream(
        train_examples, num_train, image_size, batch_size, steps_per_epoch, seed, crop_sampler, cache_limit_bytes
    )
    history = classifier.fit(stream, epochs=epochs, steps_per_epoch=steps_per_epoch, shuffle=False, verbose=verbose)

    if preprocess is None:
        def preprocess(batch_images):
            return tf.cast(batch_images, tf.float32) / 255.0

    @tf.function(reduce_retracing=True)
    def test_logits(batch_images):
        return classifier(preprocess(batch_images), training=False)

    scores, test_labels = extract_features(test_logits, test_batches)
    return _result(scores, test_labels, history), classifier


def _finetuned_classifier(encoder, num_classes, projection_head, head_layer):
    """A copy of the encoder (and of the head's first head_layer layers), then a zero-initialised linear head."""
    trainable_encoder = keras.models.clone_model(encoder)
    trainable_encoder.set_weights(encoder.get_weights())
    if head_layer and projection_head is None:
        raise ValueError(f"head_layer={head_layer} needs the projection_head to fine-tune from; received None.")
    head = _copy_of_head(projection_head, head_layer) if head_layer else None

    def features_of(images):
        features = trainable_encoder(images)
        return head(features, head_layer=head_layer) if head is not None else features

    images = keras.Input(shape=(None, None, 3), dtype="float32", name="images")
    return _zero_initialised_classifier(images, features_of, num_classes, "finetuned_classifier", "classifier")


def _augmented_stream(
    examples, num_examples, image_size, batch_size, steps_per_epoch, seed, crop_sampler, cache_limit_bytes
):
    """An endless stream of full batches (views, labels), reshuffled every pass, new crops every
    step: so that every step (not every epoch) draws new crops."""

    def augment_batch(step, batch):
        batch_images, labels = batch
        epoch, batch_index = step // steps_per_epoch, step % steps_per_epoch
        views = random_crop_and_flip(batch_images, image_size, _batch_seed(seed, epoch, batch_index), crop_sampler)
        return views, labels

    examples = _maybe_cache(examples, num_examples, image_size, cache_limit_bytes)
    stream = examples.shuffle(num_examples, seed=seed, reshuffle_each_iteration=True).repeat()
    stream = stream.batch(batch_size, drop_remainder=True).enumerate()
    return stream.map(augment_batch, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
