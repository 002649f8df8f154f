"""Peak memory and step time of SimCLR training steps with and without micro-batching (issue 14).

Each point (global batch N, micro-batch size M or none) runs in a fresh subprocess: build SimCLR
(ResNet-18, CIFAR stem, `--width_multiplier`, 2-layer head, the online probe), then take
`--steps` training steps through `fit` on one batch of random 32x32 images (augmentation included),
the first of which traces. Peak memory is the subprocess's peak resident set size
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`, which counts TensorFlow's own allocations, unlike
tracemalloc), also given above its footprint just before the first step. A point whose resident
memory passes `--memory_cap_gib` is stopped by the parent (it would not fit in that memory).

    python benchmarks/micro_batch_memory.py --width_multiplier=0.25 --micro_batch_size=128
    python benchmarks/micro_batch_memory.py --overhead_only --overhead_batch_size=1024

`--overhead_rounds` then times plain and micro-batched steps side by side in one process (A B A B at
`--overhead_batch_size`) and prints the median of the paired ratios. `--plot` draws the memory curve.
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
flags.DEFINE_integer("micro_batch_size", 128, "M of the micro-batched points.")
flags.DEFINE_float("width_multiplier", 0.25, "ResNet-18 channel width (1: channels 64..512).")
flags.DEFINE_integer("steps", 3, "Training steps per point (the first traces; the others are timed).")
flags.DEFINE_float("memory_cap_gib", 10.0, "Stop a point whose resident memory passes this.")
flags.DEFINE_integer("overhead_rounds", 4, "Side-by-side timing rounds (0: none).")
flags.DEFINE_integer("overhead_batch_size", 1024, "Global batch of the side-by-side timing.")
flags.DEFINE_bool("overhead_only", False, "Only the side-by-side timing.")
flags.DEFINE_string("plot", "", "Write the memory curve to this PNG.")
flags.DEFINE_string("point", "", "Internal: 'N,M' (M=0: plain) runs one point and prints its JSON.")
FLAGS = flags.FLAGS

GIB = 1024**3


def resident_bytes(pid="self"):
    with open(f"/proc/{pid}/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def build(micro_batch_size):
    import keras

    from simclr_keras.models.simclr import build_simclr

    keras.utils.set_random_seed(0)
    model = build_simclr(
        image_size=32, width_multiplier=FLAGS.width_multiplier, num_classes=10, seed=0,
        micro_batch_size=micro_batch_size or None,
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    return model


def one_batch(batch_size):
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch_size, 32, 32, 3), np.uint8)
    labels = rng.integers(0, 10, batch_size)
    return tf.data.Dataset.from_tensors((images, labels)).repeat()


def timed_steps(model, dataset, steps):
    """Runs `steps` steps through fit; returns each step's seconds."""
    import keras

    class Timer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds = []

        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.seconds.append(time.perf_counter() - self.start)

    timer = Timer()
    model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=[timer])
    return timer.seconds


def run_point(batch_size, micro_batch_size):
    model = build(micro_batch_size)
    dataset = one_batch(batch_size)
    before = resident_bytes()
    seconds = timed_steps(model, dataset, FLAGS.steps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    print(json.dumps({"peak_bytes": peak, "before_bytes": before, "step_seconds": seconds[1:]}))


def measure_point(batch_size, micro_batch_size):
    """Runs one point in a fresh process, stopping it past the memory cap; returns its JSON or None."""
    command = [
        sys.executable, __file__, f"--point={batch_size},{micro_batch_size}", f"--steps={FLAGS.steps}",
        f"--width_multiplier={FLAGS.width_multiplier}",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    largest = 0
    while process.poll() is None:
        try:
            largest = max(largest, resident_bytes(process.pid))
        except (FileNotFoundError, ProcessLookupError):
            break
        if largest > FLAGS.memory_cap_gib * GIB:
            process.kill()
            process.wait()
            return None
        time.sleep(0.1)
    output = process.stdout.read()
    if process.returncode != 0:
        raise RuntimeError(f"point N={batch_size} M={micro_batch_size} failed (exit {process.returncode})")
    return json.loads(output.strip().splitlines()[-1])


def memory_table():
    rows = []
    print(f"ResNet-18 CIFAR stem, width {FLAGS.width_multiplier:g}, M = {FLAGS.micro_batch_size}, float32")
    print("| global batch N | plain peak | above start | step | micro-batched peak | above start | step | time ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch_size in map(int, FLAGS.batch_sizes):
        plain = measure_point(batch_size, 0)
        micro = measure_point(batch_size, FLAGS.micro_batch_size)
        rows.append((batch_size, plain, micro))
        cells = []
        for point in (plain, micro):
            if point is None:
                cells += [f"> {FLAGS.memory_cap_gib:g} GiB (stopped)", "", ""]
            else:
                cells += [
                    f"{point['peak_bytes'] / GIB:.2f} GiB",
                    f"{(point['peak_bytes'] - point['before_bytes']) / GIB:.2f} GiB",
                    f"{statistics.median(point['step_seconds']):.1f} s",
                ]
        ratio = (
            f"{statistics.median(micro['step_seconds']) / statistics.median(plain['step_seconds']):.2f}"
            if plain and micro
            else ""
        )
        print(f"| {batch_size} | " + " | ".join(cells) + f" | {ratio} |", flush=True)
    return rows


def overhead():
    """Plain and micro-batched steps alternating in one process; the median of the paired ratios."""
    dataset = one_batch(FLAGS.overhead_batch_size)
    models = {"plain": build(0), "micro": build(FLAGS.micro_batch_size)}
    for model in models.values():
        timed_steps(model, dataset, 2)  # trace and warm up
    seconds = {name: [] for name in models}
    for _ in range(FLAGS.overhead_rounds):
        for name, model in models.items():
            seconds[name] += timed_steps(model, dataset, 1)
    ratios = [micro / plain for plain, micro in zip(seconds["plain"], seconds["micro"])]
    print(f"side by side, N = {FLAGS.overhead_batch_size}, M = {FLAGS.micro_batch_size}:")
    for name, values in seconds.items():
        listed = ", ".join(f"{value:.2f}" for value in values)
        print(f"  {name}: {listed} s (median {statistics.median(values):.2f})")
    print("  ratios: " + ", ".join(f"{ratio:.2f}" for ratio in ratios) + f" (median {statistics.median(ratios):.2f})")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for index, label in ((1, "one pass"), (2, f"micro-batches of M = {FLAGS.micro_batch_size}")):
        points = [(row[0], row[index]["peak_bytes"] / GIB) for row in rows if row[index]]
        axis.plot(*zip(*points), marker="o", label=label)
    cap = FLAGS.memory_cap_gib
    axis.axhline(cap, color="grey", linestyle="--", label=f"stopped above {cap:g} GiB")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("global batch N (images; 2N views)")
    axis.set_ylabel("peak resident memory (GiB)")
    axis.set_title(f"One SimCLR step, ResNet-18 (CIFAR stem, width {FLAGS.width_multiplier:g}), CPU")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv):
    del argv
    if FLAGS.point:
        batch_size, micro_batch_size = map(int, FLAGS.point.split(","))
        run_point(batch_size, micro_batch_size)
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not FLAGS.overhead_only:
        rows = memory_table()
        if FLAGS.plot:
            plot(rows, FLAGS.plot)
    if FLAGS.overhead_rounds:
        overhead()


if __name__ == "__main__":
    app.run(main)
