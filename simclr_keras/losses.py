"""NT-Xent, SimCLR's contrastive loss, as pure functions.

Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020 (arXiv:2002.05709), equation (1) and Algorithm 1.

Called inside `tf.distribute.Strategy.run` with more than one replica, the functions here gather the
other replicas' projections so that every anchor is contrasted with the whole global batch.
"""

import tensorflow as tf

# Added to an anchor's similarity with itself so that it never counts as a candidate. Finite (not
# -inf) so that 0 * mask stays 0 in the gradient; exp(-1e9) underflows to exactly 0.
_SELF_SIMILARITY_PENALTY = 1e9


def _gather_across_replicas(tensor):
    """Returns (tensor of all replicas concatenated on axis 0, this replica's row offset in it)."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return tensor, 0
    # all_gather is differentiable: each replica gets back the gradient of its own slice, summed
    # over the replicas that used it as a negative.
    gathered = context.all_gather(tensor, axis=0)
    replica_id = tf.cast(context.replica_id_in_sync_group, tf.int32)
    return gathered, replica_id * tf.shape(tensor)[0]


def contrastive_logits(z1, z2, temperature):
    """Scaled cosine similarities of every anchor with every candidate, and the positives' indices.

    Args:
      z1, z2: [N, D] projections of the two views of the same N images (not normalised).
      temperature: the tau of equation (1), > 0.

    Returns:
      logits: [2N, 2M] float32, where 2N anchors are this replica's views (z1 rows then z2 rows) and
        2M candidates are the views of the global batch (M = N times the number of replicas): all z1
        rows of every replica, then all z2 rows. An anchor's similarity with itself is pushed to a
        large negative value, leaving the positive and 2M - 2 negatives.
      positive_index: [2N] int32, the column of each anchor's other view.
    """
    z1 = tf.math.l2_normalize(tf.cast(z1, tf.float32), axis=-1)
    z2 = tf.math.l2_normalize(tf.cast(z2, tf.float32), axis=-1)
    global_z1, offset = _gather_across_replicas(z1)
    global_z2, _ = _gather_across_replicas(z2)
    local_size = tf.shape(z1)[0]
    global_size = tf.shape(global_z1)[0]

    anchors = tf.concat([z1, z2], axis=0)  # (2N, D)
    candidates = tf.concat([global_z1, global_z2], axis=0)  # (2M, D)
    logits = tf.matmul(anchors, candidates, transpose_b=True) / temperature  # (2N, 2M)

    local_rows = offset + tf.range(local_size)  # where this replica's z1 rows sit among the M
    self_index = tf.concat([local_rows, local_rows + global_size], axis=0)
    positive_index = tf.concat([local_rows + global_size, local_rows], axis=0)
    logits -= _SELF_SIMILARITY_PENALTY * tf.one_hot(self_index, 2 * global_size)
    return logits, positive_index


def nt_xent_with_accuracy(z1, z2, temperature):
    """NT-Xent and contrastive accuracy from a single similarity matrix.

    Returns:
      loss: scalar, the mean over this replica's 2N anchors of
        l(i, j) = -log( exp(sim(z_i, z_j)/tau) / sum_{k != i} exp(sim(z_i, z_k)/tau) ).
      accuracy: scalar, the fraction of anchors whose positive scores highest among all candidates.
    """
    logits, positive_index = contrastive_logits(z1, z2, temperature)
    per_anchor = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=positive_index, logits=logits)
    correct = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), positive_index)
    return tf.reduce_mean(per_anchor), tf.reduce_mean(tf.cast(correct, tf.float32))


def nt_xent(z1, z2, temperature):
    """The normalised temperature-scaled cross-entropy loss (NT-Xent), equation (1) of the paper.

    Each of the 2N views is an anchor whose positive is the other view of its image and whose 2N - 2
    negatives are both views of every other image in the batch. Similarity is cosine similarity, so
    the inputs need not be normalised. The result is the paper's L = 1/(2N) * sum over anchors, the
    mean over the 2N anchors. (The official TensorFlow code, `objective.add_contrastive_loss`,
    returns the sum of the two directions' means, i.e. twice this value.)

    For identical embeddings every candidate scores alike, and the loss is ln(2N - 1).

    Under `tf.distribute` with R replicas, call it in replica context with this replica's projections:
    negatives come from all replicas (2RN - 2 per anchor) and the value is the mean over this
    replica's anchors, so the mean over replicas equals the loss of the concatenated global batch.

    Args:
      z1, z2: [N, D] projections of the two views (row i of each comes from the same image).
      temperature: tau > 0 (0.5 for CIFAR, 0.1 for ImageNet in the paper).

    Returns:
      Scalar float32 loss.
    """
    return nt_xent_with_accuracy(z1, z2, temperature)[0]


def contrastive_accuracy(z1, z2, temperature=1.0):
    """Fraction of the 2N anchors whose other view is their most similar candidate."""
    return nt_xent_with_accuracy(z1, z2, temperature)[1]
