"""Why the online probe's loss climbs above chance at the learning-rate peak (issue 27, item 4).

The probe alone, on features cached from a run's encoder, trained under the run's own schedule: if
its loss still climbs with the encoder frozen, and with the whole cache as one batch (no gradient
noise), the encoder's drift and the batch's noise are not what makes it climb. Each step logs the
pre-update loss, gradient norm, update norm and weight norm, and every 10 steps lr * lambda_max, the
top eigenvalue of the loss's Hessian in (kernel, bias) by power iteration, against 2 (1 + m): above
that bound heavy-ball momentum (v = m v + lr g, w -= v; LARS's update of a variable it does not
adapt) diverges along that direction.

    python benchmarks/probe_stability.py --model_dir=runs/quickstart                  # its latest checkpoint
    python benchmarks/probe_stability.py --model_dir=runs/quickstart --checkpoint=200
    python benchmarks/probe_stability.py --model_dir=runs/quickstart --checkpoint=0    # the encoder at init

Variants: "bn_view1" (the probe before issue 27: standardised h of view 1, Glorot kernel, no decay),
"probe" (today's: standardised h of both views, N(0, 0.01^2) kernel, L2 on the kernel), "raw_h"
(the official head exactly: h as it is), each also with --full_batch, and at --lr_factor x the rate.
"""

import json
import math
import os

import numpy as np
from absl import app, flags

flags.DEFINE_string("model_dir", None, "A training run (model_config.json, checkpoints/).", required=True)
flags.DEFINE_integer("checkpoint", -1, "Step of the checkpoint to read (-1: the latest; 0: no checkpoint, the init).")
flags.DEFINE_string("dataset", "cifar10", "Dataset of the cached training images.")
flags.DEFINE_integer("batches", 20, "Batches of --batch_size images cached (their two views' h).")
flags.DEFINE_integer("batch_size", 256, "Images per step, as in the run.")
flags.DEFINE_integer("steps", 390, "Steps of the schedule (the quickstart's 2 epochs).")
flags.DEFINE_integer("warmup_steps", 97, "Linear warm-up steps (the quickstart's half epoch).")
flags.DEFINE_float("learning_rate", 1.0, "Peak learning rate (the quickstart's 1.0 x 256 / 256).")
flags.DEFINE_float("momentum", 0.9, "Momentum.")
flags.DEFINE_float("weight_decay", 1e-4, "L2 weight decay of the kernel (variants that decay).")
flags.DEFINE_string("output", None, "JSON file for the per-step logs (default: none).")
FLAGS = flags.FLAGS

EPSILON = 1.001e-5  # the probe's BatchNorm epsilon
VARIANTS = {
    "bn_view1": dict(standardise=True, both_views=False, kernel="glorot", decayed=False),
    "probe": dict(standardise=True, both_views=True, kernel="normal", decayed=True),
    "raw_h": dict(standardise=False, both_views=True, kernel="normal", decayed=True),
}


def cache_features(model_dir, checkpoint, dataset, batches, batch_size):
    """{"h1", "h2": [B, n, D] h of two random views in training mode, "y": [B, n]} from the run's encoder."""
    import keras
    import tensorflow as tf

    from simclr_keras import data, runs

    keras.utils.set_random_seed(0)
    model = runs.load_model(model_dir, restore=False)
    if checkpoint:
        directory = os.path.join(model_dir, runs.CHECKPOINTS)
        path = tf.train.latest_checkpoint(directory) if checkpoint < 0 else os.path.join(directory, f"ckpt-{checkpoint}")
        tf.train.Checkpoint(model=model).restore(path).expect_partial()
    images, _ = data.load_images(dataset, "train", model.views_shape[1], max_examples=batches * batch_size)
    cache = {"h1": [], "h2": [], "y": []}
    for x, y in images.shuffle(batches * batch_size, seed=0).batch(batch_size, drop_remainder=True):
        views = tf.concat([model.augmenter(x, training=True), model.augmenter(x, training=True)], 0)
        h = model.encoder(views, training=True).numpy().astype(np.float64)  # (2n, D), one BatchNorm batch as in training
        cache["h1"].append(h[:batch_size])
        cache["h2"].append(h[batch_size:])
        cache["y"].append(y.numpy())
    return {key: np.stack(value) for key, value in cache.items()}


def scheduled_rate(step, peak, warmup_steps, total_steps):
    if step < warmup_steps:
        return peak * step / warmup_steps
    return peak * 0.5 * (1 + math.cos(math.pi * min((step - warmup_steps) / (total_steps - warmup_steps), 1.0)))


def softmax(logits):
    exponentials = np.exp(logits - logits.max(1, keepdims=True))
    return exponentials / exponentials.sum(1, keepdims=True)


def hessian_top_eigenvalue(features, probabilities, iterations=40):
    """Top eigenvalue of the mean cross-entropy's Hessian in (W, b): E[(x, 1)(x, 1)^T (x) (diag p - p p^T)]."""
    augmented = np.concatenate([features, np.ones((len(features), 1))], 1)  # (n, D+1)
    direction = np.random.default_rng(0).normal(size=(augmented.shape[1], probabilities.shape[1]))  # (D+1, C)
    eigenvalue = 0.0
    for _ in range(iterations):
        direction /= np.linalg.norm(direction)
        logits_change = augmented @ direction  # (n, C)
        softmax_jacobian_product = probabilities * (logits_change - (probabilities * logits_change).sum(1, keepdims=True))
        product = augmented.T @ softmax_jacobian_product / len(features)
        eigenvalue = float((direction * product).sum())
        direction = product
    return eigenvalue


def step_inputs(cache, step, variant, full_batch):
    """(features [n or 2n, D], labels) of this step's batch, as the variant's probe reads them."""
    h1, h2, y = cache["h1"], cache["h2"], cache["y"]
    if full_batch:
        h1, h2, y = (array.reshape(1, -1, *array.shape[2:]) for array in (h1, h2, y))
    index = step % len(h1)
    features = np.concatenate([h1[index], h2[index]]) if variant["both_views"] else h1[index]
    labels = np.concatenate([y[index], y[index]]) if variant["both_views"] else y[index]
    if variant["standardise"]:
        features = (features - features.mean(0)) / np.sqrt(features.var(0) + EPSILON)
    return features, labels


def initial_probe(variant, width, classes):
    rng = np.random.default_rng(0)
    if variant["kernel"] == "glorot":
        limit = math.sqrt(6 / (width + classes))
        return rng.uniform(-limit, limit, (width, classes)), np.zeros(classes)
    return rng.normal(0, 0.01, (width, classes)), np.zeros(classes)


def train_probe(cache, variant, full_batch=False, lr_factor=1.0):
    """Per-step logs of the probe trained alone on the cache under the run's schedule."""
    classes = int(cache["y"].max()) + 1
    kernel, bias = initial_probe(variant, cache["h1"].shape[-1], classes)
    kernel_velocity, bias_velocity = np.zeros_like(kernel), np.zeros_like(bias)
    weight_decay = FLAGS.weight_decay if variant["decayed"] else 0.0
    log = []
    for step in range(FLAGS.steps):
        features, labels = step_inputs(cache, step, variant, full_batch)
        probabilities = softmax(features @ kernel + bias)  # (n, C)
        error = probabilities.copy()
        error[np.arange(len(labels)), labels] -= 1  # d CE / d logits
        kernel_gradient = features.T @ error / len(labels) + weight_decay * kernel
        rate = lr_factor * scheduled_rate(step, FLAGS.learning_rate, FLAGS.warmup_steps, FLAGS.steps)
        kernel_velocity = FLAGS.momentum * kernel_velocity + rate * kernel_gradient
        bias_velocity = FLAGS.momentum * bias_velocity + rate * error.mean(0)
        entry = {
            "step": step + 1, "learning_rate": rate,
            "loss": float(-np.log(probabilities[np.arange(len(labels)), labels] + 1e-30).mean()),
            "accuracy": float((probabilities.argmax(1) == labels).mean()),
            "gradient_norm": float(np.linalg.norm(kernel_gradient)),
            "update_norm": float(np.linalg.norm(kernel_velocity)), "weight_norm": float(np.linalg.norm(kernel)),
        }
        if step % 10 == 0:
            entry["lr_times_sharpness"] = rate * hessian_top_eigenvalue(features, probabilities)
        log.append(entry)
        kernel, bias = kernel - kernel_velocity, bias - bias_velocity
    return log


def summary(name, log):
    losses = np.array([entry["loss"] for entry in log])
    peak = int(np.argmax(losses))
    sharp = [round(entry["lr_times_sharpness"], 2) for entry in log if "lr_times_sharpness" in entry]
    return (
        f"{name:24s} min {losses[:100].min():.2f} (steps 1-100), max {losses[peak]:.2f} at step {peak + 1}, "
        f"last 20 steps {losses[-20:].mean():.2f} / accuracy {np.mean([e['accuracy'] for e in log[-20:]]):.3f}; "
        f"weight norm {log[0]['weight_norm']:.1f} -> {log[-1]['weight_norm']:.1f}; "
        f"max lr*lambda_max {max(sharp):.2f} (bound {2 * (1 + FLAGS.momentum):.1f})"
    )


def describe(cache):
    h = cache["h1"].reshape(-1, cache["h1"].shape[-1])
    standardised = (h - h.mean(0)) / np.sqrt(h.var(0) + EPSILON)
    return (
        f"h: {h.shape[1]} features, mean {h.mean():.3f}, std {h.std():.3f}; top eigenvalue of E[h h^T] "
        f"{np.linalg.eigvalsh(h.T @ h / len(h))[-1]:.1f}, of the standardised h's covariance "
        f"{np.linalg.eigvalsh(standardised.T @ standardised / len(h))[-1]:.1f}"
    )


def main(_):
    cache = cache_features(FLAGS.model_dir, FLAGS.checkpoint, FLAGS.dataset, FLAGS.batches, FLAGS.batch_size)
    print(describe(cache))
    logs = {}
    for name, variant in VARIANTS.items():
        for suffix, options in (("", {}), (" full batch", {"full_batch": True}), (" lr x 0.1", {"lr_factor": 0.1})):
            logs[name + suffix] = train_probe(cache, variant, **options)
            print(summary(name + suffix, logs[name + suffix]))
    if FLAGS.output:
        with open(FLAGS.output, "w", encoding="utf-8") as file:
            json.dump(logs, file)


if __name__ == "__main__":
    app.run(main)
