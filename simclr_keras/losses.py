"""NT-Xent, SimCLR's contrastive loss, as pure functions.

Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020 (arXiv:2002.05709), equation (1) and Algorithm 1.

Called inside `tf.distribute.Strategy.run` with more than one replica, the functions here gather the
other replicas' projections so that every anchor is contrasted with the whole global batch.
"""

import tensorflow as tf

from simclr_keras import model_config

# Written over an anchor's similarity with itself so that it never counts as a candidate. Finite
# (not -inf) so that no inf - inf appears in the softmax; exp(-1e9) underflows to exactly 0.
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


def _anchors_and_candidates(z1, z2, temperature):
    """The pieces of the similarity matrix, without forming it.

    Returns:
      anchors: [2N, D] this replica's normalised views (z1 rows then z2 rows), times 1/tau. Scaling
        the anchors rather than the [2N, 2M] product saves a pass over (and a copy of) the matrix.
      candidates: [2M, D] the normalised views of the global batch (M = N times the number of
        replicas): all z1 rows of every replica, then all z2 rows.
      self_positions: [2N, 2] int32 (row, column) of each anchor's similarity with itself.
      positive_index: [2N] int32, the column of each anchor's other view.
    """
    z1 = tf.math.l2_normalize(tf.cast(z1, tf.float32), axis=-1)
    z2 = tf.math.l2_normalize(tf.cast(z2, tf.float32), axis=-1)
    global_z1, offset = _gather_across_replicas(z1)
    global_z2, _ = _gather_across_replicas(z2)
    local_size = tf.shape(z1)[0]
    global_size = tf.shape(global_z1)[0]
    anchors = tf.concat([z1, z2], axis=0) * (1.0 / temperature)
    candidates = tf.concat([global_z1, global_z2], axis=0)
    local_rows = offset + tf.range(local_size)  # where this replica's z1 rows sit among the M
    self_index = tf.concat([local_rows, local_rows + global_size], axis=0)
    positive_index = tf.concat([local_rows + global_size, local_rows], axis=0)
    self_positions = tf.stack([tf.range(2 * local_size), self_index], axis=1)
    return anchors, candidates, self_positions, positive_index


def _masked_logits(anchors, candidates, self_positions):
    """[2N, 2M] anchors . candidates, with each anchor's similarity to itself overwritten by -1e9."""
    logits = tf.matmul(anchors, candidates, transpose_b=True)
    penalty = tf.fill([tf.shape(self_positions)[0]], tf.constant(-_SELF_SIMILARITY_PENALTY, logits.dtype))
    # Overwrites 2N entries (in place when nothing else holds the product) instead of subtracting a
    # one-hot [2N, 2M] mask.
    return tf.tensor_scatter_nd_update(logits, self_positions, penalty)


def contrastive_logits(z1, z2, temperature):
    """Scaled cosine similarities of every anchor with every candidate, and the positives' indices.

    Args:
      z1, z2: [N, D] projections of the two views of the same N images (not normalised).
      temperature: the tau of equation (1), > 0.

    Returns:
      logits: [2N, 2M] float32, where 2N anchors are this replica's views (z1 rows then z2 rows) and
        2M candidates are the views of the global batch (M = N times the number of replicas): all z1
        rows of every replica, then all z2 rows. An anchor's similarity with itself is pushed to a
        large negative value (-1e9), leaving the positive and 2M - 2 negatives.
      positive_index: [2N] int32, the column of each anchor's other view.
    """
    anchors, candidates, self_positions, positive_index = _anchors_and_candidates(z1, z2, temperature)
    return _masked_logits(anchors, candidates, self_positions), positive_index


def _cross_entropy_over_candidates(anchors, candidates, self_positions, positive_index):
    """Per-anchor cross-entropy and correctness of softmax over the masked similarity matrix.

    The same values as `sparse_softmax_cross_entropy_with_logits(positive_index, contrastive_logits)`,
    with a hand-written gradient so that one step holds at most two [2N, 2M] matrices: the fused
    cross-entropy kernel returns (softmax - one_hot(positive)) alongside the loss, and the gradient
    is two matrix products with it. TensorFlow's own chain would add a rescaled copy of that matrix
    (the upstream per-anchor weights) and the scatter's gradient (another copy with the self entries
    zeroed; they are exactly zero already, since exp(-1e9) underflows to 0).

    Returns:
      per_anchor: [2N] float32 losses.
      correct: [2N] float32, 1 where the positive scores highest (no gradient).
    """

    @tf.custom_gradient
    def forward(anchors, candidates):
        logits = _masked_logits(anchors, candidates, self_positions)
        per_anchor, softmax_minus_target = tf.raw_ops.SparseSoftmaxCrossEntropyWithLogits(
            features=logits, labels=positive_index
        )
        correct = tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), positive_index), tf.float32)

        def gradient(upstream, unused_upstream_correct=None):
            # d per_anchor[i] / d logits[i, :] = softmax_minus_target[i, :]. The upstream weights
            # scale rows of the [2N, D] factors, never the [2N, 2M] matrix.
            weights = upstream[:, tf.newaxis]
            d_anchors = tf.matmul(softmax_minus_target, candidates) * weights  # (2N, D)
            d_candidates = tf.matmul(softmax_minus_target, anchors * weights, transpose_a=True)  # (2M, D)
            return d_anchors, d_candidates

        return (per_anchor, tf.stop_gradient(correct)), gradient

    return forward(anchors, candidates)


def nt_xent_with_accuracy(z1, z2, temperature):
    """NT-Xent and contrastive accuracy from a single similarity matrix.

    Returns:
      loss: scalar, the mean over this replica's 2N anchors of
        l(i, j) = -log( exp(sim(z_i, z_j)/tau) / sum_{k != i} exp(sim(z_i, z_k)/tau) ).
      accuracy: scalar, the fraction of anchors whose positive scores highest among all candidates.
    """
    with tf.name_scope("nt_xent"):
        per_anchor, correct = _cross_entropy_over_candidates(*_anchors_and_candidates(z1, z2, temperature))
        return tf.reduce_mean(per_anchor), tf.reduce_mean(correct)


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


def check_hard_negative_arguments(beta, tau_plus):
    """Raises ValueError unless beta >= 0 and 0 <= tau_plus < 1 (ModelConfig's hard_negative_beta, debias_tau_plus)."""
    model_config.check_value("debias_tau_plus", tau_plus, name="tau_plus")
    model_config.check_value("hard_negative_beta", beta, name="beta")


def hard_negative_nt_xent_with_accuracy(
    z1, z2, temperature, beta=1.0, tau_plus=0.1, weights_receive_gradient=True
):
    """Hard-negative NT-Xent (HCL) and contrastive accuracy; see `hard_negative_nt_xent`."""
    check_hard_negative_arguments(beta, tau_plus)
    logits, positive_index = contrastive_logits(z1, z2, temperature)  # (2N, 2M)
    num_candidates = tf.shape(logits)[1]
    num_negatives = tf.cast(num_candidates - 2, tf.float32)  # M = 2(global batch) - 2
    is_positive = tf.cast(tf.one_hot(positive_index, num_candidates), tf.bool)
    is_self = logits < -_SELF_SIMILARITY_PENALTY / 2
    is_negative = tf.logical_not(tf.logical_or(is_positive, is_self))  # (2N, 2M)

    positive_logit = tf.reduce_sum(tf.where(is_positive, logits, 0.0), axis=1)  # (2N,)
    largest_negative = tf.reduce_max(tf.where(is_negative, logits, -_SELF_SIMILARITY_PENALTY), axis=1)
    # Every exp is taken relative to the anchor's largest logit c, so none overflows and the largest
    # term of pos + Ng is exp(0) = 1 (never all underflowing): the scale exp(-c) cancels in
    # pos / (pos + Ng), and the clamp is scaled alike.
    shift = tf.stop_gradient(tf.maximum(positive_logit, largest_negative))[:, tf.newaxis]  # (2N, 1)
    positive = tf.exp(positive_logit - shift[:, 0])
    negatives = tf.where(is_negative, tf.exp(logits - shift), 0.0)  # (2N, 2M); zero at self and positive
    # Importance weights neg^beta relative to the anchor's largest negative (<= 1; the scale cancels
    # in R). Masked in the exponent: exp(beta * (positive - largest)) may overflow to inf, and inf x 0
    # is NaN (in the value and in the gradient).
    weights = tf.exp(tf.where(is_negative, beta * (logits - largest_negative[:, tf.newaxis]), -float("inf")))
    if not weights_receive_gradient:
        weights = tf.stop_gradient(weights)
    reweighted = tf.reduce_sum(weights * negatives, axis=1) / (tf.reduce_sum(weights, axis=1) / num_negatives)
    estimate = (reweighted - tau_plus * num_negatives * positive) / (1.0 - tau_plus)
    # The reference's clamp Ng >= M exp(-1/tau), in units of exp(c).
    estimate = tf.maximum(estimate, num_negatives * tf.exp(-1.0 / temperature - shift[:, 0]))
    per_anchor = tf.math.log(positive + estimate) + shift[:, 0] - positive_logit
    correct = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), positive_index)
    return tf.reduce_mean(per_anchor), tf.reduce_mean(tf.cast(correct, tf.float32))


def hard_negative_nt_xent(z1, z2, temperature, beta=1.0, tau_plus=0.1, weights_receive_gradient=True):
    """NT-Xent with hard-negative importance weights and the debiased negative estimate.

    Robinson, Chuang, Sra, Jegelka, "Contrastive Learning with Hard Negative Samples", ICLR 2021
    (arXiv:2010.04592), with the debiasing of Chuang et al., "Debiased Contrastive Learning",
    NeurIPS 2020 (arXiv:2007.00224). For each of the 2N anchors, with pos = exp(s+ / tau), the
    M = 2N - 2 negatives' neg_k = exp(s_k / tau):

        w_k = neg_k ** beta                            importance weights: harder negatives count more
        R   = sum_k w_k * neg_k / mean_k(w_k)          the reweighted negative mass
        Ng  = max((R - tau_plus * M * pos) / (1 - tau_plus), M * exp(-1 / tau))
        loss = -log(pos / (pos + Ng)), averaged over the anchors.

    beta = 0 and tau_plus = 0 give exactly `nt_xent`; beta = 0 with tau_plus > 0 is the debiased
    loss of Chuang et al. tau_plus is the assumed probability that a "negative" shares the anchor's
    class. Negatives are gathered from every replica as in `nt_xent` (M = 2 * global batch - 2).

    Args:
      z1, z2: [N, D] projections of the two views (not normalised).
      temperature: tau > 0.
      beta: concentration on hard negatives, >= 0 (the paper's best STL-10 setting is 1.0).
      tau_plus: class prior in [0, 1) (0.1 in the paper).
      weights_receive_gradient: whether gradients flow through w_k. The reference implementation
        lets them flow (True); False treats the weights as constants, as in importance sampling.

    Returns:
      Scalar float32 loss.
    """
    return hard_negative_nt_xent_with_accuracy(z1, z2, temperature, beta, tau_plus, weights_receive_gradient)[0]
