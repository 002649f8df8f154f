"""Training throughput of `simclr_keras.train` against the PyTorch/lightly peer, side by side (issue 7).

Ours (A): the real command line, `python -m simclr_keras.train`, on an image folder (decoded once,
then two augmented views per image inside the training step), ResNet-18 with the CIFAR stem, the
2-layer head (512-512-128), NT-Xent, momentum SGD, global batch --batch_size (2 x batch_size images
through the network per step). Its speed is read from the run's train_log.jsonl: the time between
consecutive steps, after --warmup_steps.

Peer (B): torchvision ResNet-18 with the same CIFAR stem (3x3 conv, no max-pool) + lightly's
SimCLRProjectionHead(512, 512, 128) + lightly's NTXentLoss(0.5), torch.optim.SGD, channels_last;
with --precision=mixed_bfloat16 under torch.autocast("cpu", torch.bfloat16). Its two views are
random tensors made before timing: no decoding and no augmentation, which favours the peer.

A and B alternate (A B A B ...) for --rounds rounds, each in a fresh process; the table gives each
round's median images/s, the median over rounds and the ratio of the medians. Model FLOP
utilisation uses 3.3 GFLOP per 32x32 image (forward + backward of ResNet-18, CIFAR stem) against
--peak_gflops, by default the best rate of a 4096^3 matmul (TensorFlow, the same precision)
measured before and after the rounds: what this machine's cores give one large, ideal operation.

    pip install -e ".[bench]"   # torch, torchvision, lightly: only for the peer
    python benchmarks/train_throughput.py --data_dir=../shared/datasets/cifar10 --precision=mixed_bfloat16
    python benchmarks/train_throughput.py --data_dir=../shared/datasets/cifar10 --precision=float32
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags
from benchmark_command import training_command

flags.DEFINE_string("data_dir", "../shared/datasets/cifar10", "Image folder with train/<class>/*.jpg (ours only).")
flags.DEFINE_enum("precision", "mixed_bfloat16", ["float32", "mixed_bfloat16"], "Precision of both sides.")
flags.DEFINE_integer("batch_size", 128, "Images per step (each gives two views).")
flags.DEFINE_integer("steps", 14, "Steps per measurement, warm-up included.")
flags.DEFINE_integer("warmup_steps", 4, "Steps left out of each measurement (tracing, allocator warm-up).")
flags.DEFINE_integer("rounds", 2, "A B rounds.")
flags.DEFINE_float("width_multiplier", 1.0, "ResNet-18 width (both sides).")
flags.DEFINE_list("ours_flags", [], "Extra flags for simclr_keras.train, e.g. --ours_flags=--jit_compile.")
flags.DEFINE_float("peak_gflops", 0.0, "Hardware peak for MFU; 0: measured here with a 4096^3 matmul in the precision.")
flags.DEFINE_enum("only", "", ["", "ours", "peer", "matmul"], "Internal / debugging: run one side once and print JSON.")
FLAGS = flags.FLAGS

GFLOP_PER_IMAGE = 3.3  # ResNet-18, CIFAR stem, 32x32: ~0.56 GFLOP forward (x2 for multiply-adds) x3 with backward


def _median_rate(step_seconds, images_per_step):
    kept = step_seconds[FLAGS.warmup_steps:]
    if not kept:
        raise SystemExit(f"error: --steps={FLAGS.steps} leaves nothing after --warmup_steps={FLAGS.warmup_steps}.")
    return images_per_step / statistics.median(kept)


def run_ours():
    """images/s of the training command line, from the per-step times of its log."""
    with tempfile.TemporaryDirectory(prefix="bench_ours_") as model_dir:
        command = training_command(
            FLAGS.data_dir, FLAGS.batch_size, FLAGS.steps, FLAGS.precision, model_dir,
            FLAGS.width_multiplier, FLAGS.ours_flags,
        )  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise SystemExit(f"error: simclr_keras.train failed:\n{result.stderr[-3000:]}")
        with open(os.path.join(model_dir, "train_log.jsonl"), encoding="utf-8") as file:
            times = [json.loads(line)["time"] for line in file]
    steps = [later - earlier for earlier, later in zip(times, times[1:])]
    return _median_rate(steps, 2 * FLAGS.batch_size)


def run_peer():
    """images/s of torchvision ResNet-18 + lightly head and loss on random views."""
    import torch
    import torchvision
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead

    torch.manual_seed(0)
    backbone = torchvision.models.resnet18(num_classes=10)
    width = int(64 * FLAGS.width_multiplier)
    if FLAGS.width_multiplier != 1.0:
        raise SystemExit("error: the peer is built at full width only; pass --width_multiplier=1.0.")
    backbone.conv1 = torch.nn.Conv2d(3, width, 3, 1, 1, bias=False)  # the CIFAR stem
    backbone.maxpool = torch.nn.Identity()
    backbone.fc = torch.nn.Identity()
    head = SimCLRProjectionHead(512, 512, 128)
    model = torch.nn.Sequential(backbone, head).to(memory_format=torch.channels_last)
    criterion = NTXentLoss(temperature=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    views = [
        torch.rand(FLAGS.batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last) for _ in range(2)
    ]
    bfloat16 = FLAGS.precision == "mixed_bfloat16"
    step_seconds = []
    model.train()
    for _ in range(FLAGS.steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
            z = model(torch.cat(views))
            z1, z2 = z.float().chunk(2)
            loss = criterion(z1, z2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step_seconds.append(time.perf_counter() - start)
    return _median_rate(step_seconds, 2 * FLAGS.batch_size)


def run_matmul():
    """GFLOP/s of a 4096^3 matrix product in the benchmark's precision (the best of 10 calls)."""
    import tensorflow as tf

    dtype = tf.bfloat16 if FLAGS.precision == "mixed_bfloat16" else tf.float32
    a = tf.cast(tf.random.uniform([4096, 4096]), dtype)
    b = tf.cast(tf.random.uniform([4096, 4096]), dtype)
    seconds = []
    for _ in range(11):
        start = time.perf_counter()
        tf.matmul(a, b).numpy()
        seconds.append(time.perf_counter() - start)
    # The best, not the median: a peak, and the machine's speed drifts (MFU errs on the low side).
    return 2 * 4096**3 / min(seconds[1:]) / 1e9


def _run_side(side):
    command = [sys.executable, __file__, f"--only={side}"] + [
        argument for argument in sys.argv[1:] if not argument.startswith("--only")
    ]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if result.returncode:
        raise SystemExit(result.stdout[-2000:] + result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])[side]


def main(argv):
    del argv
    if FLAGS.only:
        print(json.dumps({FLAGS.only: {"ours": run_ours, "peer": run_peer, "matmul": run_matmul}[FLAGS.only]()}))
        return
    peaks = [FLAGS.peak_gflops] if FLAGS.peak_gflops else [_run_side("matmul")]
    print(f"peak: {peaks[0]:.0f} GFLOP/s ({'--peak_gflops' if FLAGS.peak_gflops else '4096^3 matmul, before the rounds'})")
    rates = {"ours": [], "peer": []}
    for round_index in range(FLAGS.rounds):
        for side in ("ours", "peer"):
            rate = _run_side(side)
            rates[side].append(rate)
            print(f"round {round_index + 1} {side}: {rate:.1f} images/s", flush=True)
    if not FLAGS.peak_gflops:
        peaks.append(_run_side("matmul"))
        print(f"peak: {peaks[1]:.0f} GFLOP/s (4096^3 matmul, after the rounds); MFU uses the higher")
    peak = max(peaks)
    ours, peer = statistics.median(rates["ours"]), statistics.median(rates["peer"])
    print(f"\n{FLAGS.precision}, batch {FLAGS.batch_size} ({2 * FLAGS.batch_size} images per step), {FLAGS.rounds} rounds")
    print("| | images/s (median) | per round | MFU |")
    print("|---|---:|---|---:|")
    for name, value in (("simclr_keras", ours), ("torch + lightly", peer)):
        per_round = ", ".join(f"{r:.1f}" for r in rates["ours" if name == "simclr_keras" else "peer"])
        print(f"| {name} | {value:.1f} | {per_round} | {100 * value * GFLOP_PER_IMAGE / peak:.0f}% |")
    print(f"\nratio simclr_keras / peer: {ours / peer:.2f} (of the medians)")
    # The machine's own speed drifts between rounds; each round's A and B ran back to back.
    paired = [a / b for a, b in zip(rates["ours"], rates["peer"])]
    print(f"per-round ratios: {', '.join(f'{r:.2f}' for r in paired)}; median {statistics.median(paired):.2f}")


if __name__ == "__main__":
    app.run(main)
