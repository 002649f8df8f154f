"""NT-Xent time and peak memory versus global batch size (issue 7: the loss is O(N^2)).

Each batch size runs in a fresh subprocess, so that its peak resident memory (ru_maxrss) is its own:
the table gives the median time of a forward + backward pass over the loss alone (projections of
dimension 128 in, gradient with respect to them out) and the peak memory above the process's
footprint before the first call. For reference, one 2N x 2N float32 matrix takes 16 N^2 bytes.

    python benchmarks/loss_scaling.py                      # 256 ... 8192, 5 timed repeats each
    python benchmarks/loss_scaling.py --batch_sizes=256,1024 --repeats=3
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_list("batch_sizes", ["256", "512", "1024", "2048", "4096", "8192"], "Global batch sizes N.")
flags.DEFINE_integer("repeats", 5, "Timed repeats per batch size (after one warm-up call).")
flags.DEFINE_integer("dim", 128, "Projection dimension.")
flags.DEFINE_enum(
    "loss",
    "nt_xent",
    ["nt_xent", "hard_negative", "textbook_nt_xent"],
    "nt_xent or hard_negative from simclr_keras.losses, or textbook_nt_xent: the same loss written the "
    "obvious way (divide the product by tau, subtract a one-hot self mask), to show what the package saves.",
)
flags.DEFINE_integer("child", 0, "Internal: time this batch size and print one JSON line.")
FLAGS = flags.FLAGS


def _peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _textbook_nt_xent(z1, z2, temperature):
    """NT-Xent as usually written: three more 2N x 2N float matrices than simclr_keras.losses."""
    import tensorflow as tf

    z = tf.math.l2_normalize(tf.concat([z1, z2], axis=0), axis=-1)
    size = tf.shape(z1)[0]
    logits = tf.matmul(z, z, transpose_b=True) / temperature
    logits -= 1e9 * tf.eye(2 * size)
    labels = tf.concat([tf.range(size, 2 * size), tf.range(size)], axis=0)
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))


def _measure(batch_size):
    import tensorflow as tf

    from simclr_keras import losses

    rng = tf.random.Generator.from_seed(0)
    z1 = rng.normal([batch_size, FLAGS.dim])
    z2 = rng.normal([batch_size, FLAGS.dim])

    @tf.function
    def loss_and_gradient(z1, z2):
        with tf.GradientTape() as tape:
            tape.watch([z1, z2])
            if FLAGS.loss == "hard_negative":
                loss = losses.hard_negative_nt_xent(z1, z2, 0.5, beta=1.0, tau_plus=0.1)
            elif FLAGS.loss == "textbook_nt_xent":
                loss = _textbook_nt_xent(z1, z2, 0.5)
            else:
                loss = losses.nt_xent(z1, z2, 0.5)
        return loss, tape.gradient(loss, [z1, z2])

    # Traced once on tiny inputs, so that the peak below is the loss's, not tracing's.
    loss_and_gradient(z1[:4], z2[:4])
    before = _peak_rss_bytes()
    times = []
    for _ in range(FLAGS.repeats + 1):
        start = time.perf_counter()
        loss, gradients = loss_and_gradient(z1, z2)
        _ = [g.numpy() for g in gradients]
        times.append(time.perf_counter() - start)
    return {
        "batch_size": batch_size,
        "median_ms": 1000 * statistics.median(times[1:]),
        "peak_extra_mib": (_peak_rss_bytes() - before) / 2**20,
        "one_matrix_mib": 4 * (2 * batch_size) ** 2 / 2**20,
        "loss": float(loss),
    }


def main(argv):
    del argv
    if FLAGS.child:
        print(json.dumps(_measure(FLAGS.child)))
        return
    print(f"{FLAGS.loss}, projections of dimension {FLAGS.dim}, forward + backward, median of {FLAGS.repeats}")
    print("| global batch N | 2N x 2N logits (MiB) | median time (ms) | peak memory above baseline (MiB) |")
    print("|---:|---:|---:|---:|")
    for batch_size in FLAGS.batch_sizes:
        command = [sys.executable, __file__, f"--child={int(batch_size)}", f"--repeats={FLAGS.repeats}",
                   f"--dim={FLAGS.dim}", f"--loss={FLAGS.loss}"]
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        if result.returncode:
            print(f"| {batch_size} | failed: {result.stderr.strip().splitlines()[-1]} | | |")
            continue
        row = json.loads(result.stdout.strip().splitlines()[-1])
        print(
            f"| {row['batch_size']} | {row['one_matrix_mib']:.0f} | {row['median_ms']:.1f} | {row['peak_extra_mib']:.0f} |"
        )


if __name__ == "__main__":
    app.run(main)
