"""MoCo v2: a momentum key encoder and a queue of negatives, in the same framework as SimCLR."""

import keras
import numpy as np
import tensorflow as tf

from simclr_keras import model_config, representation
from simclr_keras.batch_norm import batch_norm_groups
from simclr_keras.heads import ProjectionHead
from simclr_keras.models.contrastive import ContrastiveModel


def moco_logits(queries, keys, queue, temperature):
    """InfoNCE logits of MoCo: each query against its own key (column 0) and every queued key.

    Args:
      queries, keys: [N, D] L2-normalised; row i of keys is the positive of row i of queries.
      queue: [K, D] L2-normalised negatives.

    Returns:
      [N, 1 + K] float32 logits (positive first), divided by the temperature.
    """
    positive = tf.reduce_sum(queries * keys, axis=1, keepdims=True)  # (N, 1)
    negatives = tf.matmul(queries, queue, transpose_b=True)  # (N, K)
    return tf.concat([positive, negatives], axis=1) / temperature


def moco_loss_with_accuracy(queries, keys, queue, temperature):
    """Mean InfoNCE loss over the queries, and the fraction whose key outscores the whole queue."""
    logits = moco_logits(queries, keys, queue, temperature)
    labels = tf.zeros(tf.shape(logits)[0], tf.int32)
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
    accuracy = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), 0), tf.float32))
    return loss, accuracy


def enqueue(queue, pointer, keys):
    """The queue after writing `keys` from `pointer` on, wrapping around its end; and the new pointer.

    Args:
      queue: [K, D]; pointer: int scalar in [0, K); keys: [M, D] with M <= K, oldest first.
    """
    size = tf.shape(queue, out_type=tf.int64)[0]
    count = tf.shape(keys, out_type=tf.int64)[0]
    rows = (tf.cast(pointer, tf.int64) + tf.range(count, dtype=tf.int64)) % size
    return tf.tensor_scatter_nd_update(queue, rows[:, None], tf.cast(keys, queue.dtype)), (pointer + count) % size


@keras.saving.register_keras_serializable(package="simclr_keras")
class MoCo(ContrastiveModel):
    """MoCo v2 (He et al., CVPR 2020, arXiv:1911.05722; Chen et al., arXiv:2003.04297).

    The query encoder and head (the `encoder` and `projection_head`, which are what evaluation and
    export use) are trained by gradient; a key encoder and head of the same architecture follow them
    as an exponential moving average, key <- momentum * key + (1 - momentum) * query, after every
    optimizer step. Each query's positive is the key of the other view of its image, and its
    negatives are the `queue_size` most recent keys, kept in a queue that is a non-trainable model
    variable (so checkpoints hold it and a resumed run continues it). Keys from every replica are
    enqueued, oldest first.

    The key network is kept out of the optimizer (`trained_variables`), not made non-trainable: in
    Keras 3 `trainable=False` would also run its BatchNorm layers in inference mode. It runs in
    training mode, as in MoCo: BatchNorm normalises keys with batch statistics, and its moving
    statistics follow its own forward passes (they are not copied from the query network).

    With `symmetric=True` (the MoCo CIFAR-10 demo's option, solo-learn's default) both views serve
    as queries and as keys, and both views' keys are enqueued; with False, view 1 is the query and
    view 2 the key, as in the original paper. The logged `loss` is the mean InfoNCE over the queries
    (of both directions); the optimised objective is `objective_scale` times it, by default the
    demo's sum of the two directions (2) when symmetric, the loss itself (1) when not.

    BatchNorm must not let a query find its key through batch statistics (MoCo's "shuffling BN").
    As in the MoCo authors' CIFAR-10 demo (SplitBatchNorm, its single-device emulation of per-GPU
    BatchNorm), each view's batch of N images is normalised in `batch_norm_splits` groups of
    N / splits, each with its own statistics, by the query encoder as by the key encoder; the keys'
    groups are drawn from a shuffled batch, so that a key's group has no relation to its query's.
    The same code runs on every replica under tf.distribute; with synchronized BatchNorm each
    group's statistics are gathered over the replicas' corresponding groups.

    Args:
      temperature: InfoNCE temperature (0.2 in MoCo v2).
      momentum: key encoder momentum (0.99 for CIFAR-scale runs, 0.999 for ImageNet).
      queue_size: number of queued negatives K (4096 for CIFAR, 65536 for ImageNet); it must hold at
        least the keys of one step.
      symmetric: symmetric loss (see above).
      batch_norm_splits: BatchNorm groups of each view's batch, in the query and the key encoder
        (1: the whole view batch; the demo's `--bn-splits`, 8).
      objective_scale: the optimised objective over the logged loss; None: 2 if symmetric else 1.
      **kwargs: `ContrastiveModel`'s (encoder, projection_head, augmenter, num_classes, ...).
    """

    def __init__(
        self,
        *args,
        temperature=0.2,
        momentum=0.99,
        queue_size=4096,
        symmetric=True,
        batch_norm_splits=8,
        objective_scale=None,
        **kwargs,
    ):
        # The ranges of ModelConfig's moco_momentum, moco_queue_size and moco_bn_splits.
        model_config.check_value("moco_momentum", momentum, name="momentum")
        model_config.check_value("moco_queue_size", queue_size, name="queue_size")
        model_config.check_value("moco_bn_splits", batch_norm_splits, name="batch_norm_splits")
        if objective_scale is None:
            objective_scale = 2.0 if symmetric else 1.0  # the demo sums the two directions' losses
        super().__init__(*args, temperature=temperature, objective_scale=objective_scale, **kwargs)
        self.momentum = float(momentum)
        self.queue_size = int(queue_size)
        self.symmetric = bool(symmetric)
        self.batch_norm_splits = batch_norm_splits

        # The key network: same architecture, same initial weights, never trained by gradient (it is
        # left out of `trained_variables`; still `trainable`, so that its BatchNorm uses batch statistics).
        self.key_encoder = self._copy_of_encoder("key_encoder")
        self.key_projection_head = ProjectionHead.from_config(
            {**self.projection_head.get_config(), "name": "key_projection_head"}
        )
        self.key_projection_head.build(self.representation_shape)
        self.key_encoder.set_weights(self.encoder.get_weights())
        self.key_projection_head.set_weights(self.projection_head.get_weights())
        # Draws the key batch's shuffle; its state is a model variable, so resumed runs continue it.
        self.shuffle_seed_generator = keras.random.SeedGenerator(0, name="key_shuffle_seed")

        projection_dim = self.projection_head.output_dim
        # Random unit vectors, as MoCo initialises its queue; replaced after K / keys-per-step steps.
        initial_queue = np.random.default_rng(0).normal(size=(self.queue_size, projection_dim))
        initial_queue /= np.linalg.norm(initial_queue, axis=1, keepdims=True)
        # Every replica computes the same global keys and writes the same values.
        self.queue = self.add_weight(
            shape=(self.queue_size, projection_dim),
            initializer=keras.initializers.Constant(initial_queue.astype(np.float32)),
            trainable=False,
            dtype="float32",
            aggregation="only_first_replica",
            name="queue",
        )
        self.queue_pointer = self.add_weight(
            shape=(), initializer="zeros", trainable=False, dtype="int64", aggregation="only_first_replica",
            name="queue_pointer",
        )

    def _copy_of_encoder(self, name):
        """A built copy of the encoder's architecture (functional, Sequential or subclassed), fresh weights."""
        encoder_class = type(self.encoder)
        try:
            copy = encoder_class.from_config({**self.encoder.get_config(), "name": name})
        except Exception as error:  # get_config raises NotImplementedError, from_config TypeError, ...
            raise ValueError(
                f"MoCo builds its key encoder as {encoder_class.__name__}.from_config(encoder.get_config()), which "
                f"failed ({representation.first_line(error)}); give "
                f"{encoder_class.__name__} a get_config() returning its constructor arguments."
            ) from None
        representation.representation_shape(copy, self.views_shape)  # builds a Sequential or subclassed copy
        return copy

    def _momentum_pairs(self):
        """(query weight, key weight) pairs of the parameters; BatchNorm statistics are left out.

        The key network was built from the query network's config, so `weights` lists both in the
        same order; the key's BatchNorm moving statistics follow its own forward passes, as in MoCo.
        """
        query = self.encoder.weights + self.projection_head.weights
        key = self.key_encoder.weights + self.key_projection_head.weights
        return [(q, k) for q, k in zip(query, key) if q.trainable]

    @property
    def trained_variables(self):
        """The optimizer's variables: the query network's (and the probe's), never the key network's."""
        key_variables = {id(v) for v in self.key_encoder.weights + self.key_projection_head.weights}
        return [v for v in super().trained_variables if id(v) not in key_variables]

    def _project(self, encoder, head, views, num_views):
        """Projections [V*N, D] of `num_views` stacked view batches [V*N, S, S, 3], in training mode,
        each view's N images normalised in `batch_norm_splits` BatchNorm groups; and h [V*N, F]."""
        with batch_norm_groups([encoder, head], num_views * self.batch_norm_splits):
            representation = encoder(views, training=True)
            return head(representation, training=True), representation

    def _keys(self, views, num_views):
        """L2-normalised keys [V*N, D] of `num_views` stacked view batches, through shuffled BatchNorm groups.

        Each view's images are shuffled among themselves (as the demo shuffles each key batch), then
        split into groups by `_project`, then put back in their order.
        """
        count = tf.shape(views)[0]
        draws = keras.random.uniform([count], seed=self.shuffle_seed_generator)
        per_view = tf.reshape(draws, [num_views, -1])  # (V, N)
        offsets = tf.range(num_views)[:, None] * tf.shape(per_view)[1]
        order = tf.reshape(tf.argsort(per_view, axis=1) + offsets, [-1])  # a permutation within each view
        keys, _ = self._project(self.key_encoder, self.key_projection_head, tf.gather(views, order), num_views)
        # Undo the shuffle: the key of views[i] goes back to row i.
        keys = tf.scatter_nd(order[:, None], keys, tf.shape(keys))
        return tf.stop_gradient(tf.math.l2_normalize(keys, axis=1))

    def _check_batch_splits(self, view):
        """The BatchNorm groups need each view's per-replica batch N to be a multiple of the splits;
        checked here so the error names the setting, not a reshape deep inside the encoder."""
        splits = self.batch_norm_splits
        message = (
            f"MoCo: batch_norm_splits={splits} (--moco_bn_splits) must divide the number of images of "
            f"each view per replica and step; use a per-replica batch size divisible by {splits}."
        )
        size = view.shape[0]
        if size is not None:
            if size % splits:
                raise ValueError(f"{message[:-1]} (got {size}).")
            return []
        return [tf.debugging.assert_equal(tf.shape(view)[0] % splits, 0, message=message)]

    def contrastive_forward(self, view1, view2):
        with tf.control_dependencies(self._check_batch_splits(view1)):
            batch_size = tf.identity(tf.shape(view1)[0])
        queue = tf.convert_to_tensor(self.queue)
        if self.symmetric:
            views = tf.concat([view1, view2], axis=0)  # (2N, S, S, 3)
            projection, representation = self._project(self.encoder, self.projection_head, views, num_views=2)
            queries = tf.math.l2_normalize(projection, axis=1)  # (2N, D)
            keys = self._keys(views, num_views=2)
            q1, q2 = queries[:batch_size], queries[batch_size:]
            k1, k2 = keys[:batch_size], keys[batch_size:]
            loss12, accuracy12 = moco_loss_with_accuracy(q1, k2, queue, self.temperature)
            loss21, accuracy21 = moco_loss_with_accuracy(q2, k1, queue, self.temperature)
            # The logged mean over the queries; objective_scale (2) makes the optimised one their sum.
            loss, accuracy = (loss12 + loss21) / 2, (accuracy12 + accuracy21) / 2
            new_keys = tf.concat([k1, k2], axis=0)
        else:
            projection, representation = self._project(self.encoder, self.projection_head, view1, num_views=1)
            queries = tf.math.l2_normalize(projection, axis=1)
            new_keys = self._keys(view2, num_views=1)
            loss, accuracy = moco_loss_with_accuracy(queries, new_keys, queue, self.temperature)
        return loss, accuracy, representation, new_keys  # h of the query views: 2N symmetric, N otherwise

    def after_optimizer_step(self, new_keys):
        for query_weight, key_weight in self._momentum_pairs():
            key_weight.assign(self.momentum * key_weight + (1.0 - self.momentum) * tf.cast(query_weight, key_weight.dtype))
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            new_keys = context.all_gather(new_keys, axis=0)  # replica 0's keys first, as in MoCo
        queue, pointer = enqueue(self.queue, self.queue_pointer, new_keys)
        self.queue.assign(queue)
        self.queue_pointer.assign(pointer)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "momentum": self.momentum,
                "queue_size": self.queue_size,
                "symmetric": self.symmetric,
                "batch_norm_splits": self.batch_norm_splits,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if "key_batch_norm_splits" in config:  # its name before the groups applied to the queries too
            config["batch_norm_splits"] = config.pop("key_batch_norm_splits")
        return super().from_config(config)


# build_moco's keywords before ModelConfig -> the field (and flag) names.
DEPRECATED_BUILD_MOCO_NAMES = {
    "momentum": "moco_momentum",
    "queue_size": "moco_queue_size",
    "symmetric": "moco_symmetric",
    "batch_norm_splits": "moco_bn_splits",
    "synchronized_batch_norm": "global_bn",
}


def build_moco(config=None, **settings):
    """A MoCo v2 model from a `ModelConfig` (`simclr_keras.model_config`), or from its fields as keywords.

        build_moco(ModelConfig(method="moco_v2", moco_queue_size=256))
        build_moco(moco_queue_size=256)  # the same model

    Keywords update `config` (default: `ModelConfig(method="moco_v2")`). The head defaults to MoCo v2's
    own (`proj_batch_norm="none"`: Linear-ReLU-Linear with biases, no BatchNorm; `main_moco.py --mlp`),
    the temperature to 0.2. The old keywords `momentum`, `queue_size`, `symmetric`, `batch_norm_splits`
    and `synchronized_batch_norm` still work (deprecated; they are the `moco_*` fields and `global_bn`).
    """
    config = model_config.model_config_from_settings(config, settings, "moco_v2", renamed=DEPRECATED_BUILD_MOCO_NAMES)
    encoder, head, augmenter = model_config.build_components(config)
    return MoCo(
        encoder=encoder,
        projection_head=head,
        augmenter=augmenter,
        temperature=config.resolved_temperature,
        num_classes=config.num_classes,
        freeze_encoder=config.freeze_encoder,
        synchronized_batch_norm=config.global_bn,
        momentum=config.moco_momentum,
        queue_size=config.moco_queue_size,
        symmetric=config.moco_symmetric,
        batch_norm_splits=config.moco_bn_splits,
        objective_scale=config.objective_scale,
        name="moco",
    )
