"""Training throughput of simclr_keras against the PyTorch/lightly peer, side by side (issues 7 and 18).

One command measures, in alternating rounds (ours, ours without augmentation, peer, ours, ...), each
side in a fresh process, at a given ResNet-18 width, batch and precision:

- "ours": the real command line, `python -m simclr_keras.train`, on an image folder (decoded once,
  then two augmented views per image made inside the training step: crop + resize, flip, colour
  distortion, grayscale, as configs/quickstart.flags), ResNet-18 with the CIFAR stem, the 2-layer
  head (h-h-128), NT-Xent, the online linear probe, the per-step log callback, and --optimizer
  (Nesterov momentum SGD or LARS, as the command line builds them). Its speed is read from the
  run's train_log.jsonl: the time between consecutive steps.
- "ours_no_augment": the same SimCLR model and optimizer in `model.fit`, with the augmenter
  replaced by the identity and fed one batch of random views (no probe, as the peer has none):
  the peer's loop, in our library.
- "peer": torchvision's BasicBlock ResNet-18 with the CIFAR stem (3x3 conv, no max-pool) and every
  channel count times --width_multiplier, lightly's SimCLRProjectionHead(h, h, 128) and
  NTXentLoss(0.5), torch.optim.SGD (Nesterov momentum 0.9, weight decay 1e-4) or lightly's LARS,
  channels_last, bfloat16 autocast with --precision=mixed_bfloat16. Its two views are random
  tensors made before timing: forward of both views in one batch, loss, backward, optimizer step;
  no decoding, no augmentation, no probe.

Each measurement is the median step time after --warmup_steps; the table gives every round, the
median over rounds and the ratios against the peer (of the medians, and per round: A and B ran back
to back). Every result records the CPU model, its vector flags, the oneDNN/TensorFlow/PyTorch
environment variables and the package versions; --output writes it all as JSON.

    pip install -e ".[bench]"   # torch, torchvision, lightly: only for the peer
    python benchmarks/train_throughput.py --width_multiplier=0.25 --batch_size=256 --precision=float32
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/train_throughput.py ...  # an AVX2-only CPU

Emulating an AVX2-only CPU on a newer one: ONEDNN_MAX_CPU_ISA=AVX2 caps the oneDNN of both TensorFlow
and PyTorch, ATEN_CPU_CAPABILITY=avx2 PyTorch's own kernels. TensorFlow by itself would also leave
oneDNN off on such a CPU (it turns it on only with AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX), which
TF_ENABLE_ONEDNN_OPTS=0 reproduces; simclr_keras now turns it on (simclr_keras/cpu_defaults.py).
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags
from benchmark_command import LEARNING_RATES, training_command

SIDES = ("ours", "ours_no_augment", "peer")
flags.DEFINE_string("data_dir", "../shared/datasets/cifar10", "Image folder with train/<class>/*.jpg (ours only).")
flags.DEFINE_enum("precision", "float32", ["float32", "mixed_bfloat16"], "Precision of every side.")
flags.DEFINE_integer("batch_size", 256, "Images per step (each gives two views).")
flags.DEFINE_integer("steps", 10, "Steps per measurement, warm-up included.")
flags.DEFINE_integer("warmup_steps", 4, "Steps left out of each measurement (tracing, allocator warm-up).")
flags.DEFINE_integer("rounds", 3, "Rounds; each runs every side once, in a fresh process.")
flags.DEFINE_float("width_multiplier", 1.0, "ResNet-18 width (every side).")
flags.DEFINE_enum("optimizer", "sgd", ["sgd", "lars"], "Optimizer of every side.")
flags.DEFINE_list("sides", list(SIDES), f"Sides to measure, of {list(SIDES)}.")
flags.DEFINE_list("ours_flags", [], "Extra flags for simclr_keras.train, e.g. --ours_flags=--jit_compile.")
flags.DEFINE_string("output", "", "If set, write every round and the machine's description to this JSON file.")
flags.DEFINE_enum("only", "", ["", *SIDES], "Internal: run one side once and print its JSON.")
FLAGS = flags.FLAGS

# CPU flags that decide which kernels oneDNN and PyTorch pick.
_VECTOR_FLAG_PREFIXES = ("avx2", "fma", "avx512", "amx")
_ENVIRONMENT_PREFIXES = (
    "ONEDNN_", "DNNL_", "ATEN_", "OMP_", "KMP_", "MKL_",
    "TF_ENABLE_", "TF_NUM_", "TF_XLA", "TF_ONEDNN", "TF_DISABLE_MKL", "TF_INTRA", "TF_INTER",
)  # fmt: skip


def _median_rate(step_seconds, images_per_step):
    kept = step_seconds[FLAGS.warmup_steps :]
    if not kept:
        raise SystemExit(f"error: --steps={FLAGS.steps} leaves nothing after --warmup_steps={FLAGS.warmup_steps}.")
    return images_per_step / statistics.median(kept)


def run_ours():
    """images/s of the training command line, from the per-step times of its log."""
    with tempfile.TemporaryDirectory(prefix="bench_ours_") as model_dir:
        command = training_command(
            FLAGS.data_dir, FLAGS.batch_size, FLAGS.steps, FLAGS.precision, model_dir,
            FLAGS.width_multiplier, FLAGS.ours_flags, optimizer=FLAGS.optimizer,
        )  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise SystemExit(f"error: simclr_keras.train failed:\n{result.stderr[-3000:]}")
        with open(os.path.join(model_dir, "train_log.jsonl"), encoding="utf-8") as file:
            times = [json.loads(line)["time"] for line in file]
    # The first logged step ends after the first step: its duration is unknown, one fewer to drop.
    steps = [later - earlier for earlier, later in zip(times, times[1:])]
    return _median_rate([0.0] + steps, 2 * FLAGS.batch_size)


def run_ours_no_augment():
    """images/s of our SimCLR model and optimizer in `fit`, on one batch of random views (the peer's loop)."""
    from simclr_keras import optimizers  # first: the package sets TensorFlow's CPU defaults before it loads
    from simclr_keras.models.simclr import SimCLR, build_simclr

    import keras
    import tensorflow as tf

    keras.mixed_precision.set_dtype_policy(FLAGS.precision)
    keras.utils.set_random_seed(0)
    built = build_simclr(width_multiplier=FLAGS.width_multiplier, proj_layers=2, proj_dim=128, temperature=0.5)
    model = SimCLR(
        encoder=built.encoder, projection_head=built.projection_head, augmenter=keras.layers.Identity(),
        temperature=0.5,
    )  # fmt: skip
    optimizer = optimizers.build_optimizer(FLAGS.optimizer, LEARNING_RATES[FLAGS.optimizer], 1e-4, 0.9)
    model.compile(optimizer=optimizer)
    views = tf.random.uniform([FLAGS.batch_size, 32, 32, 3], seed=0)  # the augmenter (identity) makes both views
    step_ends = []

    class StepTimes(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            step_ends.append(time.perf_counter())

    start = time.perf_counter()
    dataset = tf.data.Dataset.from_tensors(views).repeat()
    model.fit(dataset, steps_per_epoch=FLAGS.steps, callbacks=[StepTimes()], verbose=0)
    ends = [start] + step_ends
    return _median_rate([later - earlier for earlier, later in zip(ends, ends[1:])], 2 * FLAGS.batch_size)


def peer_resnet18(width_multiplier):
    """torchvision's ResNet-18 layout (BasicBlock, 2-2-2-2) with the CIFAR stem and channels x width_multiplier."""
    import torch
    from torchvision.models.resnet import BasicBlock, conv1x1

    widths = [max(1, round(base * width_multiplier)) for base in (64, 128, 256, 512)]
    layers = [torch.nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), torch.nn.BatchNorm2d(widths[0]), torch.nn.ReLU()]
    channels = widths[0]
    for group, width in enumerate(widths):
        for block in range(2):
            stride = 2 if group > 0 and block == 0 else 1
            downsample = None
            if stride != 1 or channels != width:  # torchvision's projection shortcut
                downsample = torch.nn.Sequential(conv1x1(channels, width, stride), torch.nn.BatchNorm2d(width))
            layers.append(BasicBlock(channels, width, stride, downsample))
            channels = width
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()]
    return torch.nn.Sequential(*layers), channels


def run_peer():
    """images/s of the torchvision-layout ResNet-18 + lightly head and loss on random views."""
    import torch
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.utils.lars import LARS

    torch.manual_seed(0)
    backbone, features = peer_resnet18(FLAGS.width_multiplier)
    head = SimCLRProjectionHead(features, features, 128)
    model = torch.nn.Sequential(backbone, head).to(memory_format=torch.channels_last)
    criterion = NTXentLoss(temperature=0.5)
    learning_rate = LEARNING_RATES[FLAGS.optimizer]
    if FLAGS.optimizer == "lars":
        optimizer = LARS(model.parameters(), lr=learning_rate, momentum=0.9, weight_decay=1e-4)
    else:
        optimizer = torch.optim.SGD(
            model.parameters(), lr=learning_rate, momentum=0.9, nesterov=True, weight_decay=1e-4
        )
    views = torch.rand(2 * FLAGS.batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    bfloat16 = FLAGS.precision == "mixed_bfloat16"
    step_seconds = []
    model.train()
    for _ in range(FLAGS.steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
            z1, z2 = model(views).float().chunk(2)  # both views in one batch, as ours
            loss = criterion(z1, z2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step_seconds.append(time.perf_counter() - start)
    return _median_rate(step_seconds, 2 * FLAGS.batch_size)


def machine_description():
    """The CPU model, its vector flags, the kernel-selecting environment variables and the versions."""
    model, vector_flags = platform.processor(), []
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            lines = file.read().splitlines()
        model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), model)
        cpu_flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
        vector_flags = sorted(flag for flag in cpu_flags if flag.startswith(_VECTOR_FLAG_PREFIXES))
    except OSError:  # not Linux
        pass
    environment = {name: value for name, value in sorted(os.environ.items()) if name.startswith(_ENVIRONMENT_PREFIXES)}
    versions = {}
    for package in ("tensorflow", "keras", "torch", "torchvision", "lightly"):
        try:
            versions[package] = __import__("importlib.metadata").metadata.version(package)
        except Exception:  # not installed: the side that needs it fails with its own error
            versions[package] = None
    return {
        "cpu_model": model, "cpu_count": os.cpu_count(), "vector_flags": vector_flags,
        "environment": environment, "versions": versions,
    }  # fmt: skip


def _run_side(side):
    command = [sys.executable, __file__, f"--only={side}"] + [
        argument for argument in sys.argv[1:] if not argument.startswith("--only")
    ]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if result.returncode:
        raise SystemExit(result.stdout[-2000:] + result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])[side]


def _print_table(rates, machine):
    sides = [side for side in SIDES if side in rates]
    print(f"\n{machine['cpu_model']}, {machine['cpu_count']} CPUs; flags: {' '.join(machine['vector_flags'])}")
    print(f"environment: {machine['environment'] or 'none set'}")
    print(
        f"ResNet-18 x{FLAGS.width_multiplier:g}, {FLAGS.precision}, batch {FLAGS.batch_size} "
        f"({2 * FLAGS.batch_size} views per step), {FLAGS.optimizer}, {FLAGS.rounds} rounds, images/s"
    )
    print("| round | " + " | ".join(sides) + " |\n|---|" + "---:|" * len(sides))
    for index in range(FLAGS.rounds):
        print(f"| {index + 1} | " + " | ".join(f"{rates[side][index]:.1f}" for side in sides) + " |")
    medians = {side: statistics.median(rates[side]) for side in sides}
    print("| median | " + " | ".join(f"**{medians[side]:.1f}**" for side in sides) + " |")
    ratios = {}
    if "peer" in rates:
        for side in sides:
            if side != "peer":
                paired = [ours / peer for ours, peer in zip(rates[side], rates["peer"])]
                ratios[side] = {"of_medians": medians[side] / medians["peer"], "per_round": paired}
                print(
                    f"{side} / peer: {ratios[side]['of_medians']:.2f} (of the medians); per round "
                    f"{', '.join(f'{ratio:.2f}' for ratio in paired)}"
                )
    return medians, ratios


def main(argv):
    del argv
    if FLAGS.only:
        runner = {"ours": run_ours, "ours_no_augment": run_ours_no_augment, "peer": run_peer}[FLAGS.only]
        print(json.dumps({FLAGS.only: runner()}))
        return
    unknown = [side for side in FLAGS.sides if side not in SIDES]
    if unknown or not FLAGS.sides:
        raise SystemExit(f"error: --sides must name some of {list(SIDES)}, got --sides={','.join(FLAGS.sides)}.")
    machine = machine_description()
    rates = {side: [] for side in SIDES if side in FLAGS.sides}
    loads = {}
    for round_index in range(FLAGS.rounds):
        for side in rates:
            load = os.getloadavg()[0]  # other work on the machine shows here (rounds are not locked against it)
            rates[side].append(_run_side(side))
            loads.setdefault(side, []).append(load)
            rate = rates[side][-1]
            print(f"round {round_index + 1} {side}: {rate:.1f} images/s (load before: {load:.2f})", flush=True)
    medians, ratios = _print_table(rates, machine)
    if FLAGS.output:
        settings = {
            name: FLAGS[name].value
            for name in (
                "width_multiplier", "batch_size", "precision", "optimizer", "steps", "warmup_steps", "rounds", "ours_flags",
            )
        }  # fmt: skip
        with open(FLAGS.output, "w", encoding="utf-8") as file:
            json.dump(
                {
                    "machine": machine, "settings": settings, "images_per_second": rates, "medians": medians,
                    "ratios": ratios, "load_average_before": loads,
                },
                file, indent=1,
            )  # fmt: skip


if __name__ == "__main__":
    app.run(main)
