"""What SimCLR and MoCo share: encoder, head, augmenter, the online probe, logging and saving.

A `ContrastiveModel` turns each training batch into two augmented views and asks its subclass for the
contrastive loss (`contrastive_forward`); everything around that is here: the online linear probe,
the optimizer step scaled for replicas, per-step logs, evaluation of the probe and serialisation.
"""

import keras
import tensorflow as tf

from simclr_keras import model_config, representation
from simclr_keras.heads import LinearProbe
from simclr_keras.optimizers import LARS


class ContrastiveModel(keras.Model):
    """Base of the self-supervised models; see `SimCLR` and `MoCo`.

    Each training batch of images (uint8 or float in the augmenter's value range; with or without
    integer labels) becomes two independently augmented views, and the subclass's
    `contrastive_forward` returns the contrastive loss on them. When the batch carries labels and
    `num_classes` is set, an online linear probe (`heads.LinearProbe`) is trained beside it as the
    official SimCLR code trains its supervised head during pretraining (`lineareval_while_pretraining`):
    on stop_gradient(h) of every view the trained encoder encodes (both for SimCLR; the query views
    for MoCo), the mean cross-entropy over them added to the objective, where it cannot reach the
    encoder. Its kernel takes the optimizer's L2 weight decay, and under LARS it is kept out of layer
    adaptation (`compile` sees to it): plain momentum at the scheduled learning rate. Labels below 0
    (e.g. STL-10's unlabelled split) are left out of the probe's loss.

    `evaluate` encodes unaugmented images (`augmenter(x, training=False)`, encoder in inference mode)
    and reports the probe's loss and accuracy over the whole dataset.

    Logged values during training are the current step's (not running means), so that each step of a
    long run can be inspected; `evaluate` accumulates over its batches.

    Args:
      encoder: any Keras model (functional, Sequential, subclassed, a `keras.applications` network
        with pooling="avg") mapping float images in [0, 1] to the representation h, [B, D].
      projection_head: layer mapping h to z, [B, proj_dim].
      augmenter: layer called as `augmenter(images, training=...)` returning float images in [0, 1];
        `simclr_keras.augment.SimCLRAugmentation`.
      temperature: the contrastive loss's temperature tau > 0.
      num_classes: classes of the online linear probe; None for no probe.
      freeze_encoder: train only the probe, leaving encoder and head at their initial weights (their
        BatchNorm statistics still adapt): the randomly-initialised-encoder baseline.
      synchronized_batch_norm: the probe standardises features with global-batch statistics (give
        the encoder and head synchronized BatchNorm too: the `build_*` functions do).
      objective_scale: the optimised objective is objective_scale x the logged `loss` (the paper's
        L), so that it is the reference code's: official SimCLR minimises loss_a + loss_b, twice L
        (`SimCLR`'s default 2); MoCo's CIFAR-10 demo sums the two directions (`MoCo`). With LARS or
        coupled L2 weight decay this is not a mere rescaling: weight decay enters beside the gradient.
    """

    def __init__(
        self,
        encoder,
        projection_head,
        augmenter,
        temperature=0.1,
        num_classes=None,
        freeze_encoder=False,
        synchronized_batch_norm=False,
        objective_scale=1.0,
        **kwargs,
    ):
        micro_batch_size = kwargs.pop("micro_batch_size", None)  # SimCLR's argument, taken before this point
        if micro_batch_size is not None:
            raise ValueError(
                f"micro_batch_size applies to SimCLR only, got micro_batch_size={micro_batch_size!r} for "
                f"{type(self).__name__}, whose negatives come from a queue, not a large batch: leave it unset."
            )
        super().__init__(**kwargs)
        if not objective_scale > 0:
            raise ValueError(f"objective_scale must be > 0, got {objective_scale!r}.")
        model_config.check_value("temperature", temperature)
        model_config.check_value("num_classes", num_classes)
        if freeze_encoder and not num_classes:
            raise ValueError("freeze_encoder=True trains only the linear probe, so it needs num_classes.")
        self.encoder = encoder
        self.projection_head = projection_head
        self.augmenter = augmenter
        self.temperature = float(temperature)
        self.num_classes = num_classes
        self.freeze_encoder = bool(freeze_encoder)
        self.synchronized_batch_norm = bool(synchronized_batch_norm)
        self.objective_scale = float(objective_scale)
        self.probe = (
            LinearProbe(num_classes, synchronized_batch_norm=synchronized_batch_norm, name="linear_probe")
            if num_classes
            else None
        )

        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.contrastive_accuracy_tracker = keras.metrics.Mean(name="contrastive_accuracy")
        self.probe_loss_tracker = keras.metrics.Mean(name="probe_loss")
        self.probe_accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(name="probe_accuracy")

        # Build the encoder (a Sequential or subclassed one may not be), head and probe now, so that
        # weights exist before `fit`, checkpoint restores and `.keras` loading.
        self.views_shape = representation.views_shape(augmenter)  # (None, S, S, 3)
        self.representation_shape = representation.representation_shape(encoder, self.views_shape)  # (None, D)
        for layer in (self.projection_head, self.probe):
            if layer is not None and not layer.built:  # deserialised layers arrive built
                layer.build(self.representation_shape)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras' version (under a strategy scope) pulls one batch from the training iterator to build
        # the model symbolically: that batch is then never trained on, which shifts the data order
        # (and breaks exact resumption), and under MultiWorkerMirroredStrategy it fails on tuple
        # batches. Every layer here is built in __init__, so only the optimizer may need building.
        if self.optimizer is not None and not self.optimizer.built:
            with self.distribute_strategy.scope():
                self.optimizer.build(self.trained_variables)

    def compile(self, *args, **kwargs):
        """keras.Model.compile; a LARS optimizer then updates the probe by plain momentum, no trust ratio.

        As the official code keeps its supervised head out of LARS' layer adaptation; the head's
        kernel still takes LARS' weight decay (official: `add_weight_decay`).
        """
        super().compile(*args, **kwargs)
        optimizer = getattr(self.optimizer, "inner_optimizer", self.optimizer)  # under a LossScaleOptimizer
        if self.probe is not None and isinstance(optimizer, LARS):
            optimizer.exclude_from_layer_adaptation(self.probe.trainable_weights)

    def compile_from_config(self, config):
        # Keras' version skips a custom `compile` (loading a .keras file would leave the model
        # uncompiled); this one only adds to Keras', so it is called as Keras calls its own.
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.optimizer is not None:
            self.optimizer.build(self.trained_variables)

    @property
    def metrics(self):
        trackers = [self.loss_tracker, self.contrastive_accuracy_tracker]
        if self.probe is not None:
            trackers += [self.probe_loss_tracker, self.probe_accuracy_tracker]
        return trackers

    def call(self, images, training=False):
        """Returns the projections z of images preprocessed for evaluation (no random views)."""
        views = self.augmenter(images, training=False)
        return self.projection_head(self.encoder(views, training=training), training=training)

    @property
    def trained_variables(self):
        """The variables the optimizer updates: all trainable ones, or only the probe's when frozen."""
        if self.freeze_encoder:
            return list(self.probe.trainable_weights) if self.probe is not None else []
        return self.trainable_weights

    def contrastive_forward(self, view1, view2):
        """Returns (loss, contrastive accuracy, h [V*N, D], state for after_optimizer_step).

        Runs inside the gradient tape; `view1` and `view2` are [N, S, S, 3] floats in [0, 1]. h holds
        the representations of the V views the trained encoder encoded (V = 1 or 2), view 1's first:
        the online probe trains on all of them.
        """
        raise NotImplementedError

    def after_optimizer_step(self, state):
        """Updates non-gradient state (e.g. a momentum encoder) after each optimizer step."""

    def train_step(self, data):
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        view1 = self.augmenter(images, training=True)
        view2 = self.augmenter(images, training=True)
        variables = self.trained_variables

        with tf.GradientTape() as tape:
            contrastive_loss, contrastive_accuracy, representation, state = self.contrastive_forward(view1, view2)
            total_loss = self._objective(contrastive_loss, representation, labels)
            # Keras sums gradients over replicas; each replica's loss is its share of the global mean.
            replica_loss = total_loss / tf.distribute.get_strategy().num_replicas_in_sync
            scaled_loss = self.optimizer.scale_loss(replica_loss)

        gradients = tape.gradient(scaled_loss, variables)
        learning_rate = self.optimizer.learning_rate  # the rate this step uses, before the update
        self.optimizer.apply_gradients(zip(gradients, variables))
        self.after_optimizer_step(state)
        return self._step_logs(contrastive_loss, contrastive_accuracy, learning_rate)

    def _objective(self, contrastive_loss, representation, labels):
        """What the optimizer minimises: objective_scale x the contrastive loss, plus the probe's loss.

        The one place where the logged loss (the paper's) becomes the reference code's objective;
        every train step (the plain one, SimCLR's micro-batched one) goes through it.
        """
        return self.objective_scale * contrastive_loss + self._probe_loss(representation, labels)

    def _probe_loss(self, representation, labels):
        """The online probe's mean loss on stop_gradient(h) [V*N, D] of V views of N labelled images.

        0 without probe or labels; updates the probe's trackers. The official code's
        `tf.concat([labels, labels], 0)` for its two views.
        """
        if self.probe is None or labels is None:
            return 0.0
        labels = tf.reshape(labels, [-1])  # (N,)
        views = tf.shape(representation)[0] // tf.shape(labels)[0]
        probe_logits = self.probe(tf.stop_gradient(representation), training=True)  # (V*N, C)
        return self._update_probe_metrics(tf.tile(labels, [views]), probe_logits, reset=True)

    def _step_logs(self, contrastive_loss, contrastive_accuracy, learning_rate):
        """This step's logs (the trackers hold the step's values, not running means)."""
        for tracker, value in [
            (self.loss_tracker, contrastive_loss),
            (self.contrastive_accuracy_tracker, contrastive_accuracy),
        ]:
            tracker.reset_state()
            tracker.update_state(value)
        logs = {tracker.name: tracker.result() for tracker in self.metrics}
        logs["learning_rate"] = tf.cast(learning_rate, tf.float32)
        return self._reducible(logs)

    def _reducible(self, logs):
        """Makes logs reducible by Keras under MultiWorkerMirroredStrategy.

        Keras reduces multi-worker logs with `strategy.reduce("MEAN", value, axis=0)`, which fails on
        scalars (tensorflow issue 72388), so there they become shape [1]. Elsewhere they stay scalars.
        """
        if isinstance(self.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return {name: tf.reshape(value, [1]) for name, value in logs.items()}
        return logs

    def _update_probe_metrics(self, labels, probe_logits, reset):
        """Updates the probe trackers from [N] labels and [N, C] logits; returns the mean loss."""
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
        labelled = tf.cast(labels >= 0, tf.float32)  # unlabelled images carry label -1
        safe_labels = tf.maximum(labels, 0)
        per_image = keras.losses.sparse_categorical_crossentropy(safe_labels, probe_logits, from_logits=True)
        probe_loss = tf.reduce_sum(per_image * labelled) / tf.maximum(tf.reduce_sum(labelled), 1.0)
        if reset:
            self.probe_loss_tracker.reset_state()
            self.probe_accuracy_tracker.reset_state()
        self.probe_loss_tracker.update_state(per_image, sample_weight=labelled)
        self.probe_accuracy_tracker.update_state(safe_labels, probe_logits, sample_weight=labelled)
        return probe_loss

    def test_step(self, data):
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        if self.probe is None or labels is None:
            raise ValueError(
                "SimCLR.evaluate needs a dataset of (images, labels) and a model built with num_classes."
            )
        representation = self.encoder(self.augmenter(images, training=False), training=False)
        self._update_probe_metrics(labels, self.probe(representation, training=False), reset=False)
        return self._reducible(
            {tracker.name: tracker.result() for tracker in (self.probe_loss_tracker, self.probe_accuracy_tracker)}
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "encoder": keras.saving.serialize_keras_object(self.encoder),
                "projection_head": keras.saving.serialize_keras_object(self.projection_head),
                "augmenter": keras.saving.serialize_keras_object(self.augmenter),
                "temperature": self.temperature,
                "num_classes": self.num_classes,
                "freeze_encoder": self.freeze_encoder,
                "synchronized_batch_norm": self.synchronized_batch_norm,
                "objective_scale": self.objective_scale,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("encoder", "projection_head", "augmenter"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)
