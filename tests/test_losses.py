"""NT-Xent against the paper's equation (1) written as a plain loop, closed forms and finite differences."""

import math

import numpy as np
import pytest
import tensorflow as tf

from simclr_keras import losses


def paper_nt_xent(z1, z2, temperature):
    """Equation (1) and Algorithm 1 of arXiv:2002.05709, one anchor at a time, in float64."""
    n = len(z1)
    # Algorithm 1 interleaves the views: z_{2k-1}, z_{2k} are the two views of image k.
    z = np.empty((2 * n, z1.shape[1]))
    z[0::2], z[1::2] = z1, z2

    def sim(u, v):
        return u @ v / (np.linalg.norm(u) * np.linalg.norm(v))

    def pair_loss(i, j):
        numerator = math.exp(sim(z[i], z[j]) / temperature)
        denominator = sum(math.exp(sim(z[i], z[k]) / temperature) for k in range(2 * n) if k != i)
        return -math.log(numerator / denominator)

    return sum(pair_loss(2 * k, 2 * k + 1) + pair_loss(2 * k + 1, 2 * k) for k in range(n)) / (2 * n)


@pytest.mark.parametrize("n,dim,temperature", [(2, 3, 1.0), (5, 8, 0.5), (16, 4, 0.1)])
def test_matches_the_papers_per_anchor_loop(n, dim, temperature):
    rng = np.random.default_rng(n)
    z1 = rng.normal(size=(n, dim)).astype(np.float32)
    z2 = rng.normal(size=(n, dim)).astype(np.float32) * 3.0  # scale must not matter: cosine
    got = float(losses.nt_xent(z1, z2, temperature))
    assert got == pytest.approx(paper_nt_xent(z1.astype(np.float64), z2.astype(np.float64), temperature), rel=1e-5)


@pytest.mark.parametrize("n", [1, 4, 64])
def test_identical_embeddings_give_log_2n_minus_1(n):
    z = np.ones((n, 7), np.float32)
    assert float(losses.nt_xent(z, z, 0.5)) == pytest.approx(math.log(2 * n - 1), rel=1e-6)


def test_orthogonal_images_with_identical_views():
    z = np.eye(6, dtype=np.float32)  # orthogonal images, identical views
    temperature = 0.5
    loss, accuracy = losses.nt_xent_with_accuracy(z, z, temperature)
    # Each anchor: positive similarity 1, 2N-2 = 10 negatives at similarity 0.
    expected = -math.log(math.exp(1 / temperature) / (math.exp(1 / temperature) + 10))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(accuracy) == 1.0


def test_accuracy_counts_anchors_whose_positive_wins():
    e = np.eye(3, dtype=np.float32)
    # Image 0's views agree; images 1 and 2 each have a view identical to the other's second view,
    # so their four anchors rank a negative (cosine 1) above their positive (cosine 0): 2 of 6 right.
    z1 = e[[0, 1, 2]]
    z2 = e[[0, 2, 1]]
    assert float(losses.contrastive_accuracy(z1, z2)) == pytest.approx(2 / 6)
    assert float(losses.contrastive_accuracy(z1, z1 + 0.1)) == 1.0


def test_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    z1 = tf.constant(rng.normal(size=(4, 5)), tf.float64)
    z2 = tf.constant(rng.normal(size=(4, 5)), tf.float64)

    def loss_fn(a, b):
        # float64 end to end so that finite differences are accurate.
        a = tf.math.l2_normalize(a, axis=-1)
        b = tf.math.l2_normalize(b, axis=-1)
        return losses.nt_xent(tf.cast(a, tf.float32), tf.cast(b, tf.float32), 0.5)

    with tf.GradientTape() as tape:
        tape.watch([z1, z2])
        loss = loss_fn(z1, z2)
    analytic = tape.gradient(loss, z1).numpy()

    def paper(a):
        return paper_nt_xent(a, z2.numpy(), 0.5)

    numeric = np.zeros_like(analytic)
    eps = 1e-5
    for index in np.ndindex(*analytic.shape):
        plus, minus = z1.numpy().copy(), z1.numpy().copy()
        plus[index] += eps
        minus[index] -= eps
        numeric[index] = (paper(plus) - paper(minus)) / (2 * eps)
    np.testing.assert_allclose(analytic, numeric, atol=2e-4)


def textbook_per_anchor_nt_xent(z1, z2, temperature):
    """NT-Xent per anchor as usually written (one-hot self mask, TensorFlow's own gradients)."""
    z = tf.math.l2_normalize(tf.concat([z1, z2], axis=0), axis=-1)
    n = tf.shape(z1)[0]
    logits = tf.matmul(z, z, transpose_b=True) / temperature - 1e9 * tf.eye(2 * n)
    labels = tf.concat([tf.range(n, 2 * n), tf.range(n)], axis=0)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)


@pytest.mark.parametrize("compiled", [False, True])
def test_hand_written_gradient_matches_autodiff_of_the_textbook_loss(compiled):
    # The package's gradient is written by hand (to hold fewer 2N x 2N matrices); it must equal what
    # TensorFlow derives from the plain formula, for both views, for any per-anchor weighting.
    rng = np.random.default_rng(5)
    z1 = tf.constant(rng.normal(size=(32, 16)), tf.float32)
    z2 = tf.constant(rng.normal(size=(32, 16)), tf.float32)
    weights = tf.constant(rng.uniform(0.1, 2.0, size=64), tf.float32)

    def both(z1, z2):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch([z1, z2])
            ours = losses._cross_entropy_over_candidates(*losses._anchors_and_candidates(z1, z2, 0.1))[0]
            textbook = textbook_per_anchor_nt_xent(z1, z2, 0.1)
            ours_weighted, textbook_weighted = tf.reduce_sum(weights * ours), tf.reduce_sum(weights * textbook)
            ours_mean = 3.0 * losses.nt_xent(z1, z2, 0.1)
            textbook_mean = 3.0 * tf.reduce_mean(textbook)
        return (
            tape.gradient(ours_weighted, [z1, z2]),
            tape.gradient(textbook_weighted, [z1, z2]),
            tape.gradient(ours_mean, [z1, z2]),
            tape.gradient(textbook_mean, [z1, z2]),
        )

    run = tf.function(both) if compiled else both
    ours_weighted, textbook_weighted, ours_mean, textbook_mean = run(z1, z2)
    for got, want in zip(ours_weighted + ours_mean, textbook_weighted + textbook_mean):
        assert float(tf.reduce_max(tf.abs(want))) > 1e-2  # the gradient is not trivially zero
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-6)


def test_is_symmetric_in_the_two_views_and_invariant_to_batch_order():
    rng = np.random.default_rng(3)
    z1 = rng.normal(size=(6, 4)).astype(np.float32)
    z2 = rng.normal(size=(6, 4)).astype(np.float32)
    order = rng.permutation(6)
    base = float(losses.nt_xent(z1, z2, 0.2))
    assert float(losses.nt_xent(z2, z1, 0.2)) == pytest.approx(base, rel=1e-6)
    assert float(losses.nt_xent(z1[order], z2[order], 0.2)) == pytest.approx(base, rel=1e-6)


def paper_hard_negative_loss(z1, z2, temperature, beta, tau_plus):
    """The HCL objective of arXiv:2010.04592 (with Chuang et al.'s debiasing), one anchor at a time."""
    n = len(z1)
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    m = 2 * n - 2
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        pos = math.exp(z[i] @ z[j] / temperature)
        neg = np.array([math.exp(z[i] @ z[k] / temperature) for k in range(2 * n) if k not in (i, j)])
        weights = neg**beta
        reweighted = np.sum(weights * neg) / np.mean(weights)
        estimate = max((-tau_plus * m * pos + reweighted) / (1 - tau_plus), m * math.exp(-1 / temperature))
        total += -math.log(pos / (pos + estimate))
    return total / (2 * n)


@pytest.mark.parametrize(
    "beta,tau_plus,temperature", [(1.0, 0.1, 0.5), (0.5, 0.0, 0.2), (0.0, 0.1, 0.5), (2.0, 0.3, 0.1)]
)
def test_hard_negative_loss_matches_a_per_anchor_loop(beta, tau_plus, temperature):
    rng = np.random.default_rng(7)
    z1 = rng.normal(size=(6, 5)).astype(np.float32)
    z2 = (z1 + 0.5 * rng.normal(size=(6, 5))).astype(np.float32)
    got = float(losses.hard_negative_nt_xent(z1, z2, temperature, beta=beta, tau_plus=tau_plus))
    assert got == pytest.approx(paper_hard_negative_loss(z1, z2, temperature, beta, tau_plus), rel=1e-4)


def test_hard_negative_loss_special_cases():
    rng = np.random.default_rng(8)
    z1, z2 = rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=(5, 4)).astype(np.float32)
    # beta = 0, tau_plus = 0: plain NT-Xent.
    plain = float(losses.nt_xent(z1, z2, 0.5))
    assert float(losses.hard_negative_nt_xent(z1, z2, 0.5, beta=0.0, tau_plus=0.0)) == pytest.approx(plain, rel=1e-5)
    # Identical embeddings: every similarity is 1, so Ng = (M e^{1/t} - tau M e^{1/t}) / (1 - tau)
    # = M e^{1/t} and the loss is ln(1 + M) = ln(2N - 1).
    same = np.ones((5, 4), np.float32)
    assert float(losses.hard_negative_nt_xent(same, same, 0.5, beta=1.0, tau_plus=0.1)) == pytest.approx(
        math.log(9), rel=1e-5
    )
    with pytest.raises(ValueError, match="tau_plus"):
        losses.hard_negative_nt_xent(z1, z2, 0.5, tau_plus=1.0)


def test_hard_negative_weights_gradient_option_changes_only_the_gradient():
    rng = np.random.default_rng(9)
    z1 = tf.constant(rng.normal(size=(4, 3)), tf.float32)
    z2 = tf.constant(rng.normal(size=(4, 3)), tf.float32)
    values, gradients = [], []
    for flows in (True, False):
        with tf.GradientTape() as tape:
            tape.watch(z1)
            loss = losses.hard_negative_nt_xent(z1, z2, 0.5, beta=1.0, tau_plus=0.1, weights_receive_gradient=flows)
        values.append(float(loss))
        gradients.append(tape.gradient(loss, z1).numpy())
    assert values[0] == pytest.approx(values[1], rel=1e-6)
    assert not np.allclose(gradients[0], gradients[1])


def reference_hard_negative_loss_float64(z1, z2, temperature, beta, tau_plus):
    """The HCL reference code's criterion (joshr17/HCL image/main.py, estimator "hard"), vectorised in
    float64 TensorFlow so that its gradient can be taken: exp(600) is still finite in float64."""
    n = z1.shape[0]
    out = tf.math.l2_normalize(tf.concat([z1, z2], axis=0), axis=1)  # (2N, D)
    similarities = tf.exp(tf.matmul(out, out, transpose_b=True) / temperature)  # (2N, 2N)
    index = np.arange(2 * n)
    mask = np.ones((2 * n, 2 * n), bool)
    mask[index, index] = False  # self
    mask[index, (index + n) % (2 * n)] = False  # positive
    neg = tf.reshape(tf.boolean_mask(similarities, mask), [2 * n, -1])  # (2N, 2N - 2)
    pos = tf.exp(tf.reduce_sum(out[:n] * out[n:], axis=1) / temperature)
    pos = tf.concat([pos, pos], axis=0)
    count = 2 * n - 2
    importance = tf.exp(beta * tf.math.log(neg))
    reweighted = tf.reduce_sum(importance * neg, axis=1) / tf.reduce_mean(importance, axis=1)
    estimate = (-tau_plus * count * pos + reweighted) / (1 - tau_plus)
    estimate = tf.maximum(estimate, count * math.exp(-1 / temperature))
    return tf.reduce_mean(-tf.math.log(pos / (pos + estimate)))


@pytest.mark.parametrize("temperature,beta", [(0.1, 20.0), (0.1, 50.0), (0.05, 30.0), (0.02, 10.0)])
def test_hard_negative_loss_and_gradient_stay_finite_at_extreme_beta_and_temperature(temperature, beta):
    # Close views (positives 0.88-0.99) and negatives down to 0.15 below: for some anchors
    # exp(beta * (positive - largest negative) / temperature) overflows float32 (exp(88) is its largest).
    rng = np.random.default_rng(11)
    z1 = rng.normal(size=(6, 4)).astype(np.float32)
    z2 = (z1 + 0.3 * rng.normal(size=(6, 4))).astype(np.float32)
    tau_plus = 0.1
    z1_variable, z2_variable = tf.Variable(z1), tf.Variable(z2)
    with tf.GradientTape() as tape:
        loss = losses.hard_negative_nt_xent(z1_variable, z2_variable, temperature, beta=beta, tau_plus=tau_plus)
    gradients = tape.gradient(loss, [z1_variable, z2_variable])
    reference_inputs = [tf.Variable(z.astype(np.float64)) for z in (z1, z2)]
    with tf.GradientTape() as tape:
        expected = reference_hard_negative_loss_float64(*reference_inputs, temperature, beta, tau_plus)
    expected_gradients = tape.gradient(expected, reference_inputs)
    assert math.isfinite(float(expected))
    assert float(loss) == pytest.approx(float(expected), rel=1e-4)
    for gradient, expected_gradient in zip(gradients, expected_gradients):
        assert np.all(np.isfinite(gradient.numpy()))
        scale = np.abs(expected_gradient.numpy()).max()
        np.testing.assert_allclose(gradient.numpy(), expected_gradient.numpy(), atol=1e-3 * scale)
