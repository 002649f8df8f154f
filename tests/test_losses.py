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


def test_is_symmetric_in_the_two_views_and_invariant_to_batch_order():
    rng = np.random.default_rng(3)
    z1 = rng.normal(size=(6, 4)).astype(np.float32)
    z2 = rng.normal(size=(6, 4)).astype(np.float32)
    order = rng.permutation(6)
    base = float(losses.nt_xent(z1, z2, 0.2))
    assert float(losses.nt_xent(z2, z1, 0.2)) == pytest.approx(base, rel=1e-6)
    assert float(losses.nt_xent(z1[order], z2[order], 0.2)) == pytest.approx(base, rel=1e-6)
