"""Where a training step's time goes: profile `simclr_keras.train` and sum op time by kind (issue 7).

Runs the real command line with --profile_steps (the same model as train_throughput.py), reads the
TensorFlow trace it writes (MODEL_DIR/tensorboard/plugins/profile/*/*.xplane.pb, also viewable in
TensorBoard's Profile tab) and prints, per op type and per layer group, the share of the summed op
time. Shares, not seconds: TensorFlow runs independent ops side by side on its inter-op threads, so
the ops' durations add up to more than the wall time when they overlap.

    python benchmarks/step_profile.py --data_dir=../shared/datasets/cifar10 --precision=mixed_bfloat16
"""

import collections
import glob
import os
import subprocess
import tempfile

from absl import app, flags
from benchmark_command import training_command

flags.DEFINE_string("data_dir", "../shared/datasets/cifar10", "Image folder with train/<class>/*.jpg.")
flags.DEFINE_enum("precision", "mixed_bfloat16", ["float32", "mixed_bfloat16"], "Precision of the run.")
flags.DEFINE_integer("batch_size", 128, "Images per step (each gives two views).")
flags.DEFINE_float("width_multiplier", 1.0, "ResNet-18 width.")
flags.DEFINE_enum("optimizer", "sgd", ["sgd", "lars"], "Optimizer of the run.")
flags.DEFINE_list("profile_steps", ["6", "9"], "FIRST,LAST global steps to profile (after tracing and warm-up).")
flags.DEFINE_integer("top", 15, "Rows of the op-type table.")
flags.DEFINE_list("train_flags", [], "Extra flags for simclr_keras.train.")
FLAGS = flags.FLAGS


def _op_seconds(xplane_path):
    """{op name: seconds} over the executor threads of the host CPU plane."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(xplane_path, "rb") as file:
        space.ParseFromString(file.read())
    plane = next(plane for plane in space.planes if plane.name == "/host:CPU")
    seconds = collections.Counter()
    for line in plane.lines:
        if not line.name.startswith("tf_Compute"):  # TensorFlow's op-executing threads
            continue
        for event in line.events:
            name = plane.event_metadata[event.metadata_id].name  # "scope/op_name:OpType"
            if ":" in name and "::" not in name:  # ops, not the executor's own events ("ExecutorState::Process")
                seconds[name] += event.duration_ps / 1e12
            elif name == "CpuExecutable::ExecuteAsyncOnStream":
                # An XLA computation: its kernels run on XLA's threads, unnamed; without --jit_compile
                # the only one in the step is the augmenter's training view (its jit_compile="auto").
                seconds["augmenter/xla:XLA computation"] += event.duration_ps / 1e12
    return seconds


def _group(op_name):
    """A coarse part of the step from an op's scope: the layer group, the head, the optimizer..."""
    scope = op_name.rsplit(":", 1)[0]
    for part, key in (
        ("augment", "augmenter"), ("loss", "nt_xent"), ("projection head", "projection_head"),
        ("probe", "linear_probe"), ("optimizer", "sgd"), ("optimizer", "lars"), ("optimizer", "adamw"),
    ):  # fmt: skip
        if key in scope:
            return part
    for group in ("stem", "group1", "group2", "group3", "group4"):
        if f"/{group}" in scope or f"_{group}" in scope or scope.split("/")[-1].startswith(group):
            return f"encoder {group}"
    return "encoder other" if "encoder" in scope else "other"


def main(argv):
    del argv
    first, last = (int(step) for step in FLAGS.profile_steps)
    with tempfile.TemporaryDirectory(prefix="step_profile_") as model_dir:
        command = training_command(
            FLAGS.data_dir, FLAGS.batch_size, last + 1, FLAGS.precision, model_dir, FLAGS.width_multiplier,
            extra_flags=[f"--profile_steps={first},{last}", *FLAGS.train_flags], optimizer=FLAGS.optimizer,
        )
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        if result.returncode:
            raise SystemExit(f"error: simclr_keras.train failed:\n{result.stderr[-3000:]}")
        traces = glob.glob(os.path.join(model_dir, "tensorboard", "plugins", "profile", "*", "*.xplane.pb"))
        if not traces:
            raise SystemExit("error: the run wrote no profile (is --profile_steps within the run?).")
        seconds = _op_seconds(traces[0])

    total = sum(seconds.values())
    by_type, by_group = collections.Counter(), collections.Counter()
    for name, value in seconds.items():
        by_type[name.rsplit(":", 1)[1].removeprefix("_MklNative").removeprefix("_Mkl")] += value
        by_group[_group(name)] += value
    print(
        f"ResNet-18 x{FLAGS.width_multiplier:g}, {FLAGS.precision}, batch {FLAGS.batch_size}, {FLAGS.optimizer}, "
        f"steps {first}-{last}: {total:.2f} s of op time ({total / (last - first + 1):.2f} s per step)"
    )
    print("\n| op type | share of op time |\n|---|---:|")
    for name, value in by_type.most_common(FLAGS.top):
        print(f"| {name} | {100 * value / total:.1f}% |")
    print("\n| part of the step | share of op time |\n|---|---:|")
    for name, value in by_group.most_common():
        print(f"| {name} | {100 * value / total:.1f}% |")


if __name__ == "__main__":
    app.run(main)
