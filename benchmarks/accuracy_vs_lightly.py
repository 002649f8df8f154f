"""kNN accuracy and training time at equal budget: simclr_keras against lightly 1.6 (issue 15).

Both sides train ResNet-18 with the CIFAR stem (3x3 conv stride 1, no max-pool) at --width_multiplier,
for --train_epochs at batch --batch_size, on the same first --max_train_examples images of the
CIFAR-10 image folder (class-balanced: `simclr_keras.data.list_image_folder`'s order, the images
`--max_train_examples` takes), each with its own recipe:

- lightly (benchmarks/lightly_peer.py): lightly's CIFAR-10 benchmark recipe in a plain PyTorch loop
  over a DataLoader of those image files (SimCLRTransform(input_size=32, cj_strength=0.5,
  gaussian_blur=0), SimCLRProjectionHead, NTXentLoss(0.5), SGD 0.06 x B/128, momentum 0.9,
  weight decay 5e-4, cosine per epoch).
- simclr_keras: `python -m simclr_keras.train` with the study's SimCLR recipe
  (configs/cifar10.flags, then studies/cpu_budget.flags, then --warmup_epochs; the kNN monitor and
  the probe evaluation off, so the run is training only).

Each trains in its own process with --threads threads (OMP_NUM_THREADS; TF_NUM_INTRAOP_THREADS and
TF_NUM_INTEROP_THREADS for ours, torch.set_num_threads / set_num_interop_threads for the peer).
Then this process extracts h of both encoders (inference mode, each with its own evaluation
preprocessing) for the same uint8 arrays: the training subset as the kNN memory and --test_examples
test images, and classifies them with one function, `simclr_keras.evaluation.knn_classify`
(cosine similarity, k=200, votes exp(s / 0.1), as lightly's `knn_predict`).

Times, from the same clock for both: `train_seconds` from the start of the training loop (ours: the
command's last line before `model.fit`, so it includes building the input pipeline and tracing the
step) to the end of the last step; `command_seconds` from launching the process to that same end
(imports, decoding, model building included). Steady images/s: 2 x batch over the median step.

    pip install -e ".[bench]"   # torch, torchvision, lightly: only for the peer
    python benchmarks/accuracy_vs_lightly.py        # the study's CPU budget: 8 minutes on 2 cores
    python benchmarks/accuracy_vs_lightly.py --width_multiplier=1 --train_epochs=200 --batch_size=512 \\
        --max_train_examples=0 --warmup_epochs=10 --peer_workers=8 --threads=0   # full scale, on a GPU
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from simclr_keras.cli import fail, reject_positional_arguments  # no TensorFlow import

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_string("data_dir", "../shared/datasets/cifar10", "Image folder with train/<class>/*.jpg and test/<class>/*.jpg.")
flags.DEFINE_float("width_multiplier", 0.25, "ResNet-18 width, both sides (0.25: channels 16..128).")
flags.DEFINE_integer("train_epochs", 2, "Pretraining epochs, both sides.")
flags.DEFINE_integer("batch_size", 256, "Images per step, both sides (two views each).")
flags.DEFINE_integer("max_train_examples", 16000, "First N training images, class-balanced; 0: all. Also the kNN memory.")
flags.DEFINE_integer("test_examples", 0, "kNN query images: the first N test images, class-balanced; 0: all.")
flags.DEFINE_float("warmup_epochs", 0.2, "Ours only: warm-up epochs (the study's 0.2; the official recipe's 10 at full scale).")
flags.DEFINE_integer("knn_k", 200, "kNN neighbours.")
flags.DEFINE_float("knn_temperature", 0.1, "kNN temperature of the votes exp(similarity / T).")
flags.DEFINE_integer("threads", 2, "CPU threads of each side (intra- and inter-op); 0: each library's default.")
flags.DEFINE_integer("peer_workers", 0, "DataLoader worker processes of the peer (0: augmentation in the training thread).")
flags.DEFINE_integer("seed", 0, "Seed of both sides.")
flags.DEFINE_list("ours_flags", [], "Extra flags for simclr_keras.train, e.g. --ours_flags=--precision=mixed_bfloat16.")
flags.DEFINE_string("work_dir", "", "Keep the runs here (default: a temporary directory, removed at the end).")
flags.DEFINE_string("output", "benchmarks/results/accuracy_vs_lightly.json", "Results JSON.")
flags.DEFINE_enum("only", "", ["", "peer"], "Internal: train the peer in this process (reads and writes --work_dir).")
FLAGS = flags.FLAGS

INPUTS = "inputs.npz"  # the kNN arrays both encoders see
TRAIN_FILES = "train_files.json"  # the peer's training images
PEER_RESULT = "peer.json"
PEER_FEATURES = "peer_features.npz"
OURS_DIR = "simclr_keras_run"
# The last line simclr_keras.train prints before model.fit (see simclr_keras/train.py).
OURS_FIT_MARKER = "logged loss:"


def thread_environment():
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    if FLAGS.threads:
        threads = str(FLAGS.threads)
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
            environment[name] = threads
    return environment


def step_summary(step_seconds, batch_size):
    """Median step time and steady images/s (2 views per image) over the steps after the first."""
    steady = step_seconds[1:] or step_seconds
    median = statistics.median(steady)
    return {"steps": len(step_seconds), "median_step_seconds": median, "images_per_second": 2 * batch_size / median}


# --------------------------------------------------------------------------------------
# The peer, in its own process (no TensorFlow there)
# --------------------------------------------------------------------------------------


def run_peer_here():
    import numpy as np
    import torch

    import lightly_peer

    if FLAGS.threads:
        torch.set_num_threads(FLAGS.threads)
        torch.set_num_interop_threads(FLAGS.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with open(os.path.join(FLAGS.work_dir, TRAIN_FILES), encoding="utf-8") as file:
        paths = json.load(file)
    backbone, timing = lightly_peer.train(
        paths, FLAGS.width_multiplier, FLAGS.train_epochs, FLAGS.batch_size, FLAGS.seed, FLAGS.peer_workers, device
    )
    inputs = np.load(os.path.join(FLAGS.work_dir, INPUTS))
    np.savez(
        os.path.join(FLAGS.work_dir, PEER_FEATURES),
        train=lightly_peer.encode(backbone, inputs["train_images"], device=device),
        test=lightly_peer.encode(backbone, inputs["test_images"], device=device),
    )
    timing.update(device=device, torch_threads=torch.get_num_threads())
    with open(os.path.join(FLAGS.work_dir, PEER_RESULT), "w", encoding="utf-8") as file:
        json.dump(timing, file)


def train_peer(work_dir):
    """(timing, features {train, test}) of the peer, trained in a fresh process."""
    import numpy as np

    arguments = [argument for argument in sys.argv[1:] if not argument.startswith(("--only", "--work_dir"))]
    command = [sys.executable, os.path.abspath(__file__), "--only=peer", f"--work_dir={work_dir}", *arguments]
    launch_time = time.time()
    with open(os.path.join(work_dir, "peer.log"), "w", encoding="utf-8") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=thread_environment(), cwd=REPO_ROOT)
    if result.returncode:
        raise SystemExit(f"error: the lightly peer failed; its log: {os.path.join(work_dir, 'peer.log')}")
    with open(os.path.join(work_dir, PEER_RESULT), encoding="utf-8") as file:
        timing = json.load(file)
    features = dict(np.load(os.path.join(work_dir, PEER_FEATURES)))
    summary = {
        "train_seconds": timing["end_time"] - timing["start_time"],
        "command_seconds": timing["end_time"] - launch_time,
        **step_summary(timing["step_seconds"], FLAGS.batch_size),
        "data_seconds": timing["data_seconds"],
        "last_loss": timing["last_loss"],
        "device": timing["device"],
        "torch_threads": timing["torch_threads"],
    }
    return summary, features


# --------------------------------------------------------------------------------------
# Ours
# --------------------------------------------------------------------------------------


def ours_command(model_dir, data_dir):
    return [
        sys.executable, "-m", "simclr_keras.train", "--flagfile=configs/cifar10.flags",
        "--flagfile=studies/cpu_budget.flags", f"--warmup_epochs={FLAGS.warmup_epochs:g}",
        f"--dataset=folder:{data_dir}", f"--width_multiplier={FLAGS.width_multiplier:g}",
        f"--max_train_examples={FLAGS.max_train_examples}", f"--batch_size={FLAGS.batch_size}",
        f"--train_epochs={FLAGS.train_epochs}", "--knn_every_n_epochs=0", "--eval_split=", f"--seed={FLAGS.seed}",
        f"--checkpoint_every_n_steps={10**9}", f"--model_dir={model_dir}", *FLAGS.ours_flags,
    ]  # fmt: skip


def train_ours(work_dir, data_dir):
    """(timing, command) of `python -m simclr_keras.train`; its per-step times from train_log.jsonl."""
    model_dir = os.path.join(work_dir, OURS_DIR)
    command = ours_command(model_dir, data_dir)
    fit_start = None
    launch_time = time.time()
    with open(os.path.join(work_dir, "simclr_keras.log"), "w", encoding="utf-8") as log:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=thread_environment(),
            cwd=REPO_ROOT,
        )  # fmt: skip
        for line in process.stdout:  # unbuffered (PYTHONUNBUFFERED): each line arrives as printed
            if fit_start is None and line.startswith(OURS_FIT_MARKER):
                fit_start = time.time()
            log.write(line)
        returncode = process.wait()
    if returncode or fit_start is None:
        raise SystemExit(f"error: simclr_keras.train failed; its log: {os.path.join(work_dir, 'simclr_keras.log')}")
    with open(os.path.join(model_dir, "train_log.jsonl"), encoding="utf-8") as file:
        records = [json.loads(line) for line in file]
    end_times = [fit_start] + [record["time"] for record in records]
    step_seconds = [later - earlier for earlier, later in zip(end_times, end_times[1:])]
    summary = {
        "train_seconds": end_times[-1] - fit_start,
        "command_seconds": end_times[-1] - launch_time,
        **step_summary(step_seconds, FLAGS.batch_size),
        "last_loss": records[-1]["loss"],
    }
    return summary, model_dir, command


def ours_features(model_dir, inputs):
    import numpy as np

    from simclr_keras import evaluation, runs

    features = evaluation.feature_function_from_model(runs.load_model(model_dir))
    encoded = {}
    for name in ("train", "test"):
        images = inputs[f"{name}_images"]
        blocks = [np.asarray(features(images[start:start + 500]), np.float32) for start in range(0, len(images), 500)]
        encoded[name] = np.concatenate(blocks)
    return encoded


# --------------------------------------------------------------------------------------
# The same images and the same kNN for both
# --------------------------------------------------------------------------------------


def decoded_split(data_dir, split, max_examples):
    """(uint8 images [N, 32, 32, 3], int64 labels [N]): the first N of the split, class-balanced."""
    import numpy as np

    from simclr_keras import data

    examples, _ = data.load_images(f"folder:{data_dir}", split, 32, None, max_examples, strict=True)
    pairs = list(examples.batch(1024).as_numpy_iterator())
    return np.concatenate([pair[0] for pair in pairs]), np.concatenate([pair[1] for pair in pairs]).astype(np.int64)


def prepare_inputs(work_dir, data_dir):
    """Writes the peer's training files and the kNN arrays into work_dir; returns the arrays."""
    import numpy as np

    from simclr_keras import data

    # The order simclr_keras.data takes its first --max_train_examples from: so both train on these.
    paths, _, class_names = data.list_image_folder(data_dir, "train")
    paths = paths[: FLAGS.max_train_examples or None]
    train_images, train_labels = decoded_split(data_dir, "train", FLAGS.max_train_examples)
    test_images, test_labels = decoded_split(data_dir, "test", FLAGS.test_examples)
    with open(os.path.join(work_dir, TRAIN_FILES), "w", encoding="utf-8") as file:
        json.dump(paths, file)
    inputs = {
        "train_images": train_images, "train_labels": train_labels,
        "test_images": test_images, "test_labels": test_labels,
    }  # fmt: skip
    np.savez(os.path.join(work_dir, INPUTS), **inputs)
    return inputs, len(class_names)


def knn_accuracy(features, inputs, num_classes):
    """kNN top-1 and top-5 of the test features against the training features: one function for both."""
    from simclr_keras import evaluation

    _, scores = evaluation.knn_classify(
        features["train"], inputs["train_labels"], features["test"], FLAGS.knn_k, FLAGS.knn_temperature, num_classes
    )
    return {
        "knn_top1": evaluation.top_k_accuracy(scores, inputs["test_labels"], 1),
        "knn_top5": evaluation.top_k_accuracy(scores, inputs["test_labels"], 5),
        "h_dim": int(features["train"].shape[1]),
    }


# --------------------------------------------------------------------------------------
# The record
# --------------------------------------------------------------------------------------


def machine():
    """CPU model, its vector-instruction flags, cores, GPUs: what the times depend on."""
    import tensorflow as tf

    model, cpu_flags = None, []
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model is None:
                    model = value.strip()
                if key.strip() == "flags" and not cpu_flags:
                    cpu_flags = sorted(f for f in value.split() if f.startswith(("avx", "amx", "fma", "f16c")))
    gpus = [device.name for device in tf.config.list_physical_devices("GPU")]
    return {"cpu": model, "cpu_flags": cpu_flags, "cores": os.cpu_count(), "gpus": gpus}


def versions():
    from importlib.metadata import PackageNotFoundError, version

    from simclr_keras import study

    import tensorflow as tf

    found = {"tensorflow": tf.__version__}  # its distribution's name varies (tensorflow, tensorflow-cpu, ...)
    for package in ("keras", "torch", "torchvision", "lightly"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return {**found, "simclr_keras": study.provenance()}


def print_table(record):
    settings = record["settings"]
    print(
        f"\nResNet-18 (CIFAR stem) x{settings['width_multiplier']:g}, {settings['train_images']} training images, "
        f"{settings['train_epochs']} epochs at batch {settings['batch_size']}; kNN k={settings['knn_k']} "
        f"T={settings['knn_temperature']:g} on {settings['test_images']} test images; {record['threads']} threads"
    )
    print("| | kNN top-1 | kNN top-5 | train s | command s | steady images/s | steps |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, side in record["results"].items():
        print(
            f"| {name} | {100 * side['knn_top1']:.2f}% | {100 * side['knn_top5']:.2f}% | {side['train_seconds']:.1f} | "
            f"{side['command_seconds']:.1f} | {side['images_per_second']:.1f} | {side['steps']} |"
        )


def validate(data_dir):
    for name in ("train_epochs", "batch_size"):
        if FLAGS[name].value < 1:
            fail(f"--{name} must be >= 1, received {FLAGS[name].value}.")
    for name in ("max_train_examples", "test_examples", "threads", "peer_workers"):
        if FLAGS[name].value < 0:
            fail(f"--{name} must be >= 0, received {FLAGS[name].value}.")
    if not FLAGS.width_multiplier > 0:
        fail(f"--width_multiplier must be > 0, received {FLAGS.width_multiplier}.")
    if FLAGS.max_train_examples and FLAGS.max_train_examples < FLAGS.batch_size:
        fail(f"--max_train_examples={FLAGS.max_train_examples} is smaller than --batch_size={FLAGS.batch_size}.")
    for split in ("train", "test"):
        if not os.path.isdir(os.path.join(data_dir, split)):
            fail(f"--data_dir={FLAGS.data_dir} has no {split}/ folder; pass the CIFAR-10 image folder (train/, test/).")


def main(argv):
    reject_positional_arguments(argv)
    if FLAGS.only == "peer":
        run_peer_here()
        return
    data_dir = os.path.abspath(FLAGS.data_dir)
    validate(data_dir)
    work_dir = os.path.abspath(FLAGS.work_dir) if FLAGS.work_dir else tempfile.mkdtemp(prefix="accuracy_vs_lightly_")
    os.makedirs(work_dir, exist_ok=True)
    inputs, num_classes = prepare_inputs(work_dir, data_dir)
    print(f"{len(inputs['train_labels'])} training and {len(inputs['test_labels'])} test images; runs in {work_dir}")
    load_before = os.getloadavg()  # other processes on the machine slow a side down: recorded
    peer, peer_features = train_peer(work_dir)
    peer["load_average_before_after"] = [load_before[0], os.getloadavg()[0]]
    print(f"lightly: trained in {peer['train_seconds']:.1f} s", flush=True)
    load_before = os.getloadavg()
    ours, model_dir, command = train_ours(work_dir, data_dir)
    ours["load_average_before_after"] = [load_before[0], os.getloadavg()[0]]
    print(f"simclr_keras: trained in {ours['train_seconds']:.1f} s", flush=True)
    peer.update(knn_accuracy(peer_features, inputs, num_classes))
    ours.update(knn_accuracy(ours_features(model_dir, inputs), inputs, num_classes))
    record = {
        "benchmark": "accuracy_vs_lightly",
        "command": " ".join([os.path.relpath(sys.argv[0], os.getcwd()), *sys.argv[1:]]),
        "ours_command": " ".join(["python", *command[1:]]),
        "settings": {
            "width_multiplier": FLAGS.width_multiplier, "train_epochs": FLAGS.train_epochs,
            "batch_size": FLAGS.batch_size, "train_images": len(inputs["train_labels"]),
            "test_images": len(inputs["test_labels"]), "knn_k": FLAGS.knn_k, "knn_temperature": FLAGS.knn_temperature,
            "seed": FLAGS.seed, "warmup_epochs_ours": FLAGS.warmup_epochs, "peer_workers": FLAGS.peer_workers,
        },  # fmt: skip
        "threads": FLAGS.threads or "default",
        "machine": machine(),
        "versions": versions(),
        "date": time.strftime("%Y-%m-%d"),
        "results": {"lightly": peer, "simclr_keras": ours},
    }
    output = os.path.abspath(FLAGS.output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w", encoding="utf-8") as file:
        json.dump(record, file, indent=1)
    print_table(record)
    print(f"\nwrote {output}")
    if not FLAGS.work_dir:
        import shutil

        shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
