"""Gradient caching: one exact optimizer step over a large batch, encoded a micro-batch at a time.

Gao, Zhang, Han, Callan, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup",
RepL4NLP 2021 (arXiv:2101.06983). The contrastive loss needs every projection of the batch at once,
but the encoder does not need every activation at once:

1. pass 1: encode and project each micro-batch (both views of M images, 2M views) without a tape,
   keeping only z (2N x proj_dim) and h (2N x D, for the online probe);
2. the loss over all of z, with negatives from the whole batch and every replica, exactly as the
   plain step computes it, and its gradient with respect to z;
3. pass 2: re-encode each micro-batch under a tape and back-propagate its slice of that gradient,
   summing the parameter gradients; then one optimizer step.

Peak activation memory is that of 2M views instead of 2N, for one extra forward pass.

BatchNorm normalises each micro-batch with its own statistics (the same in both passes, so pass 2
reproduces pass 1's z), as it does on each replica without synchronized BatchNorm; its moving
statistics are updated once per micro-batch, in pass 2 (pass 1's updates are undone). Synchronized
BatchNorm on several replicas normalises every replica's k-th micro-batch together; the loop over
micro-batches is then unrolled in the graph, since tf.distribute allows no all-reduce inside a
tf.while_loop. Micro-batches run one after the other either way, so that only one micro-batch's
activations are alive at a time.
"""

import keras
import tensorflow as tf

from simclr_keras import model_config


def check_micro_batch_size(micro_batch_size, per_replica_batch_size=None):
    """Raises ValueError unless micro_batch_size is None or an integer >= 1 dividing the batch.

    Args:
      micro_batch_size: images per micro-batch (each contributes its 2 views), or None for none.
      per_replica_batch_size: images each replica trains on per step, when known.
    """
    model_config.check_value("micro_batch_size", micro_batch_size)
    if micro_batch_size is None:
        return
    if per_replica_batch_size is not None and per_replica_batch_size % micro_batch_size:
        raise ValueError(
            f"micro_batch_size={micro_batch_size} must divide the {per_replica_batch_size} images each replica "
            f"trains on per step; pick a divisor of {per_replica_batch_size}."
        )


def micro_batched_train_step(model, data):
    """`model.train_step` (a `SimCLR` with `micro_batch_size` set) by gradient caching.

    The same step as `ContrastiveModel.train_step` (same views, objective, probe, loss scaling and
    logs) up to BatchNorm's per-micro-batch statistics; see the module docstring. A batch whose size
    is only known when it runs (the last, smaller batch of `fit(x, batch_size=...)`) is split into
    micro-batches of M and one of the rest.
    """
    images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
    # Drawn once: both passes read these tensors, so the augmenter's random state advances once.
    view1 = model.augmenter(images, training=True)
    view2 = model.augmenter(images, training=True)
    split = _MicroBatches(tf.shape(view1)[0], view1.shape[0], model.micro_batch_size, _synchronizes_replicas(model))
    variables = model.trained_variables
    probe_ids = {id(v) for v in model.probe.trainable_weights} if model.probe is not None else set()
    encoder_variables = [v for v in variables if id(v) not in probe_ids]
    probe_variables = [v for v in variables if id(v) in probe_ids]

    # A frozen encoder gets no gradients: pass 1 is then the only pass and keeps its BatchNorm updates.
    z1, z2, representation = _encode_without_gradients(
        model, view1, view2, split, keep_moving_statistics=not encoder_variables
    )  # (N, P), (N, P), (2N, D)
    with tf.GradientTape() as tape:
        tape.watch([z1, z2])
        contrastive_loss, contrastive_accuracy = model.contrastive_loss(z1, z2)
        total_loss = model._objective(contrastive_loss, representation, labels)  # the plain step's objective
        replica_loss = total_loss / tf.distribute.get_strategy().num_replicas_in_sync
        scaled_loss = model.optimizer.scale_loss(replica_loss)
    # The gather's gradient brings back, to each replica, the other replicas' use of its z as negatives
    # (and None for a probe without labels, which the optimizer then skips, as in the plain step).
    z1_gradient, z2_gradient, *probe_gradients = tape.gradient(scaled_loss, [z1, z2] + probe_variables)

    encoder_gradients = []
    if encoder_variables:
        encoder_gradients = _backpropagate(model, view1, view2, z1_gradient, z2_gradient, encoder_variables, split)
    gradient_of = {id(v): g for v, g in zip(encoder_variables + probe_variables, encoder_gradients + probe_gradients)}
    learning_rate = model.optimizer.learning_rate  # the rate this step uses, before the update
    model.optimizer.apply_gradients([(gradient_of[id(v)], v) for v in variables])
    model.after_optimizer_step(None)
    return model._step_logs(contrastive_loss, contrastive_accuracy, learning_rate)


def _synchronizes_replicas(model):
    """Whether encoder or head hold a synchronisation point (synchronized BatchNorm) on several replicas.

    MirroredStrategy and MultiWorkerMirroredStrategy reject one inside a tf.while_loop (their
    all-reduce is a `merge_call`), so the micro-batch loop is then unrolled.
    """
    if tf.distribute.get_strategy().num_replicas_in_sync == 1:
        return False
    layers = model.encoder._flatten_layers() + model.projection_head._flatten_layers()
    return any(getattr(layer, "synchronized", False) for layer in layers)


class _MicroBatches:
    """How a per-replica batch of N images splits into K micro-batches of M, and the loop over them.

    A batch size known while tracing must be a multiple of M (ValueError otherwise); one known only
    when it runs ends with a smaller micro-batch if it is not.
    """

    def __init__(self, batch_size, static_batch_size, micro_batch_size, unrolled):
        if static_batch_size is not None:
            check_micro_batch_size(micro_batch_size, static_batch_size)
            self.count = static_batch_size // micro_batch_size
        elif unrolled:
            raise ValueError(
                "micro_batch_size with synchronized BatchNorm on several replicas needs a batch size known while "
                "tracing: batch the dataset with drop_remainder=True."
            )
        else:
            self.count = (batch_size + micro_batch_size - 1) // micro_batch_size
        self.size = micro_batch_size
        self.unrolled = unrolled

    def views(self, view1, view2, index):
        """Both views of micro-batch `index`: (2m, S, S, 3), first views then second, as the plain step's 2N."""
        return tf.concat([self.rows(view1, index), self.rows(view2, index)], axis=0)

    def rows(self, tensor, index):
        """Rows [index*M, (index+1)*M) of tensor (fewer for the last micro-batch of a ragged batch)."""
        start = index * self.size
        return tensor[start : start + self.size]

    def loop(self, body, state):
        """state = body(index, state) for each micro-batch in turn; one micro-batch's activations alive at a time."""
        if not self.unrolled:
            return tf.while_loop(
                lambda index, _: index < self.count,
                lambda index, state: (index + 1, body(index, state)),
                (0, state),
                parallel_iterations=1,
            )[1]
        for index in range(self.count):
            # Micro-batch k + 1 starts once micro-batch k is done, as the while loop would run them.
            previous = [t.flow if isinstance(t, tf.TensorArray) else t for t in tf.nest.flatten(state)]
            with tf.control_dependencies(previous):
                state = body(index, state)
        return state


def _encode_without_gradients(model, view1, view2, split, keep_moving_statistics):
    """Pass 1: z1, z2 (N, P) and h (2N, D: the first views', then the second's), float32, a micro-batch at a time.

    Runs in training mode (BatchNorm on micro-batch statistics, as pass 2 will); unless
    keep_moving_statistics, the moving statistics it updates are put back afterwards.
    """
    state = model.encoder.non_trainable_variables + model.projection_head.non_trainable_variables
    saved = [] if keep_moving_statistics else [tf.identity(variable) for variable in state]
    representation_width = model.representation_shape[-1]
    projection_width = model.projection_head.compute_output_shape(model.representation_shape)[-1]

    def pieces(width):  # one (m, width) piece per micro-batch, concatenated after the loop
        return tf.TensorArray(tf.float32, size=split.count, infer_shape=False, element_shape=[None, width])

    def body(index, arrays):
        z1, z2, h1, h2 = arrays
        views = split.views(view1, view2, index)
        representation = model.encoder(views, training=True)  # (2m, D)
        projection = tf.cast(model.projection_head(representation, training=True), tf.float32)  # (2m, P)
        representation = tf.cast(representation, tf.float32)
        half = tf.shape(views)[0] // 2
        return (
            z1.write(index, projection[:half]),
            z2.write(index, projection[half:]),
            h1.write(index, representation[:half]),
            h2.write(index, representation[half:]),
        )

    z1, z2, h1, h2 = split.loop(
        body, (pieces(projection_width), pieces(projection_width), pieces(representation_width), pieces(representation_width))
    )
    # Reads and assignments of the same variables run in program order inside tf.function.
    for variable, value in zip(state if saved else [], saved):
        variable.assign(value)
    batch_size = view1.shape[0]
    views = None if batch_size is None else 2 * batch_size
    return (
        tf.ensure_shape(z1.concat(), [batch_size, projection_width]),
        tf.ensure_shape(z2.concat(), [batch_size, projection_width]),
        tf.ensure_shape(tf.concat([h1.concat(), h2.concat()], axis=0), [views, representation_width]),
    )


def _backpropagate(model, view1, view2, z1_gradient, z2_gradient, variables, split):
    """Pass 2: sum over micro-batches of (d loss / d z_k) . (d z_k / d variables), re-encoding each."""

    def body(index, accumulated):
        with tf.GradientTape() as tape:
            representation = model.encoder(split.views(view1, view2, index), training=True)
            projection = model.projection_head(representation, training=True)  # (2m, P), as in pass 1
        upstream = tf.concat([split.rows(z1_gradient, index), split.rows(z2_gradient, index)], axis=0)
        gradients = tape.gradient(
            projection,
            variables,
            output_gradients=tf.cast(upstream, projection.dtype),
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        return [total + tf.cast(gradient, total.dtype) for total, gradient in zip(accumulated, gradients)]

    return split.loop(body, [tf.zeros(variable.shape, variable.dtype) for variable in variables])
