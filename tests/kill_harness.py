"""Kill harness (issue 19): SIGKILL a training run at random moments, rerun the same command, compare.

    python tests/kill_harness.py --kills=30 --seed=0        # the long run; prints one line per kill
    python tests/kill_harness.py train FLAGS...            # the training command with the fault hooks

Each attempt launches the same `simclr_keras.train` command on one run directory and kills it with
SIGKILL at a drawn target: right after start, during a step, in the middle of a log line, at one of
three points inside a checkpoint write, during the final evaluation, during the export, or at a
random time. After the last kill the command runs to its end, and the run must equal an
uninterrupted run of the same command: every variable of the final checkpoint and of the export bit
for bit, the evaluation results, and the log (each step once, with the same values).

How a kill is known to hit a checkpoint write: the `train` role (test build only; the package has
no such hooks) wraps TensorFlow's CheckpointManager.save and, inside it, pauses for --pause seconds
at three points, writing "enter"/"leave" lines to a phase file: `merge` (the shards are written in
ckpt-N_temp/, not yet merged into ckpt-N.*), `index` (ckpt-N.* complete, `checkpoint` index not yet
updated) and `sweep` (index updated, old checkpoints being deleted). The log line is written in two
halves with a pause between, so a kill there leaves half a line. The harness kills inside a pause and
reads the phase file to classify every kill, random ones included. After each kill it reads every
checkpoint the index lists in full (none may be half-written) and requires the rerun to resume from
the latest of them (a damaged latest would fall back to an older one, with a warning).
"""

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.abspath(__file__)
PHASES_ENV, PAUSE_ENV = "SIMCLR_HARNESS_PHASES", "SIMCLR_HARNESS_PAUSE"
CHECKPOINT_POINTS = ("merge", "index", "sweep")
TRAINING_TARGETS = ("start", "step", "log", "random") + tuple(f"checkpoint.{point}" for point in CHECKPOINT_POINTS)
FINAL_TARGETS = ("evaluation", "export")
SAVE_COUNTER = "save_counter/.ATTRIBUTES/VARIABLE_VALUE"
LOG_PAUSE_FRACTION = 0.25  # the log pause is this part of --pause: it comes at every step


# ------------------------------------------------------------------ the trainer with fault hooks


def _install_hooks(phase_path, pause):
    """Marks the phases of a training run in phase_path and pauses inside the writes (see the module doc)."""
    import keras
    from tensorflow.python.checkpoint import checkpoint_management
    from tensorflow.python.ops import gen_io_ops

    from simclr_keras import callbacks, export, plots

    descriptor = os.open(phase_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    inside_save = {"active": False, "recorded": False}

    def mark(event, phase):
        os.write(descriptor, f"{event} {phase} {time.time():.6f}\n".encode())

    def pause_in(phase, fraction=1.0):
        mark("enter", phase)
        time.sleep(pause * fraction)
        mark("leave", phase)

    def marked(phase, function, before=None):
        def wrapper(*args, **kwargs):
            mark("enter", phase)
            if before:
                before()
            try:
                return function(*args, **kwargs)
            finally:
                mark("leave", phase)

        return wrapper

    save, merge = checkpoint_management.CheckpointManager.save, gen_io_ops.merge_v2_checkpoints
    manager_class = checkpoint_management.CheckpointManager
    record_state, sweep = manager_class._record_state, manager_class._sweep

    def hooked_save(self, *args, **kwargs):
        inside_save.update(active=True, recorded=False)
        try:
            return marked("checkpoint", save)(self, *args, **kwargs)
        finally:
            inside_save["active"] = False

    def hooked_merge(*args, **kwargs):
        if inside_save["active"]:  # SavedModel export merges too: pause only inside a checkpoint write
            pause_in("checkpoint.merge")
        return merge(*args, **kwargs)

    def hooked_record_state(self):
        if inside_save["active"] and not inside_save["recorded"]:
            inside_save["recorded"] = True
            pause_in("checkpoint.index")
        return record_state(self)

    def hooked_sweep(self):
        if inside_save["active"]:
            pause_in("checkpoint.sweep")
        return sweep(self)

    checkpoint_management.CheckpointManager.save = hooked_save
    gen_io_ops.merge_v2_checkpoints = hooked_merge
    checkpoint_management.CheckpointManager._record_state = hooked_record_state
    checkpoint_management.CheckpointManager._sweep = hooked_sweep
    _hook_log_lines(callbacks, pause_in)
    keras.Model.evaluate = marked("evaluation", keras.Model.evaluate, before=lambda: time.sleep(pause))
    export.export_encoder = marked("export", export.export_encoder)
    plots.write_run_plots = marked("plots", plots.write_run_plots)


def _hook_log_lines(callbacks, pause_in):
    """Makes StepLogger write each line in two halves, pausing between them ("log")."""

    class HalvedWrites:
        def __init__(self, file):
            self.file = file

        def write(self, data):
            half = len(data) // 2
            written = self.file.write(data[:half])
            pause_in("log", LOG_PAUSE_FRACTION)
            return written + self.file.write(data[half:])

        def close(self):
            self.file.close()

    on_train_begin = callbacks.StepLogger.on_train_begin

    def hooked_on_train_begin(self, logs=None):
        on_train_begin(self, logs)
        self._file = HalvedWrites(self._file)

    callbacks.StepLogger.on_train_begin = hooked_on_train_begin


def train_with_hooks(flags):
    from absl import app

    from simclr_keras import train

    _install_hooks(os.environ[PHASES_ENV], float(os.environ.get(PAUSE_ENV, "0.3")))
    app.run(train.main, argv=["simclr_keras.train", *flags])


# ------------------------------------------------------------------ reading a run


def read_phases(path, offset=0):
    """The (event, phase, time) lines of a phase file from byte `offset` on (complete lines only)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as file:
        file.seek(offset)
        lines = file.read().split("\n")[:-1]
    return [(event, phase, float(moment)) for event, phase, moment in (line.split() for line in lines)]


def open_phase(phases):
    """The innermost phase entered and not left, or None ("checkpoint.index" inside "checkpoint")."""
    stack = []
    for event, phase, _ in phases:
        if event == "enter":
            stack.append(phase)
        elif phase in stack:
            stack.remove(phase)
    return stack[-1] if stack else None


def log_steps(model_dir):
    """The steps of train_log.jsonl's complete lines (a last line cut short is left out)."""
    path = os.path.join(model_dir, "train_log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, "rb") as file:
        lines = file.read().split(b"\n")[:-1]
    return [json.loads(line)["step"] for line in lines]


def read_log_records(model_dir):
    with open(os.path.join(model_dir, "train_log.jsonl"), encoding="utf-8") as file:
        return [{key: value for key, value in json.loads(line).items() if key != "time"} for line in file]


def latest_step(model_dir):
    import tensorflow as tf

    latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    return int(latest.rsplit("-", 1)[-1]) if latest else 0


def read_listed_checkpoints(model_dir):
    """Reads every tensor of every checkpoint the index lists; raises if one is incomplete. Returns their steps."""
    import tensorflow as tf

    state = tf.train.get_checkpoint_state(os.path.join(model_dir, "checkpoints"))
    if state is None:
        return []
    for path in state.all_model_checkpoint_paths:
        reader = tf.train.load_checkpoint(path)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    return [int(path.rsplit("-", 1)[-1]) for path in state.all_model_checkpoint_paths]


def checkpoint_tensors(prefix):
    import tensorflow as tf

    reader = tf.train.load_checkpoint(prefix)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def highest_export(export_dir):
    versions = sorted(int(name) for name in os.listdir(export_dir) if name.isdigit())
    for version in versions:  # every version served must be complete
        for required in ("saved_model.pb", os.path.join("variables", "variables.index")):
            assert os.path.exists(os.path.join(export_dir, str(version), required)), (version, required)
    return os.path.join(export_dir, str(versions[-1])), len(versions)


def differences(run_dir, reference_dir, total_steps):
    """What differs between a run and the uninterrupted reference run; [] when they are equal."""
    import numpy as np

    found = []
    final = os.path.join("checkpoints", f"ckpt-{total_steps}")
    for name, (mine, theirs) in {
        "final checkpoint": (os.path.join(run_dir, "model", final), os.path.join(reference_dir, "model", final)),
        "export": (
            os.path.join(highest_export(os.path.join(run_dir, "export"))[0], "variables", "variables"),
            os.path.join(highest_export(os.path.join(reference_dir, "export"))[0], "variables", "variables"),
        ),
    }.items():
        mine, theirs = checkpoint_tensors(mine), checkpoint_tensors(theirs)
        # save_counter counts one process's saves (runs.make_checkpoint_manager restores model and
        # optimizer, not it); checkpoints are numbered by step, so it is bookkeeping, not state.
        for tensors in (mine, theirs):
            tensors.pop(SAVE_COUNTER, None)
        if mine.keys() != theirs.keys():
            found.append(f"{name}: variables {sorted(mine.keys() ^ theirs.keys())[:3]} on one side only")
        shared = sorted(mine.keys() & theirs.keys())
        found += [f"{name}: {key} differs" for key in shared if not np.array_equal(mine[key], theirs[key])]
    steps = log_steps(os.path.join(run_dir, "model"))
    if steps != list(range(1, total_steps + 1)):
        found.append(f"log steps are not 1..{total_steps} once each: {steps}")
    elif read_log_records(os.path.join(run_dir, "model")) != read_log_records(os.path.join(reference_dir, "model")):
        found.append("log records differ from the reference's")
    results = [json.load(open(os.path.join(d, "model", "eval_results.json"))) for d in (run_dir, reference_dir)]
    if results[0] != results[1]:
        found.append(f"eval_results.json differ: {results}")
    return found


# ------------------------------------------------------------------ the harness


def training_command(data_dir, run_dir, total_steps, hooks):
    entry = [HERE, "train"] if hooks else ["-m", "simclr_keras.train"]
    return [
        sys.executable, *entry, f"--dataset=folder:{data_dir}", f"--model_dir={run_dir}/model",
        f"--export_dir={run_dir}/export", f"--train_steps={total_steps}", "--checkpoint_every_n_steps=4",
        "--batch_size=16", "--width_multiplier=0.125", "--optimizer=sgd", "--learning_rate=0.5",
        "--eval_batch_size=50", "--seed=3",
    ]  # fmt: skip


def _wait_for(process, condition, timeout=300):
    """Polls condition() every 5 ms until it returns a moment (time.time()); None if the process ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        moment = condition()
        if moment is not None:
            return moment
        if process.poll() is not None:
            return None
        time.sleep(0.005)
    raise TimeoutError("the trainer did not reach its kill target")


def _kill_trigger(target, phase_path, offset, rng, pause):
    """(condition, delay): kill `delay` seconds after the moment condition() returns (None until then)."""
    launched = time.time()
    if target == "start":  # importing, locking, loading the data, building the model, the first steps
        return (lambda: launched), rng.uniform(0.0, 8.0)
    if target == "random":
        return (lambda: launched), rng.uniform(0.0, 15.0)
    if target == "step":  # after a few steps of this attempt (each marks one "log" phase)
        steps_to_go = rng.randint(1, 6)

        def stepped():
            done = [moment for event, name, moment in read_phases(phase_path, offset) if (event, name) == ("leave", "log")]
            return done[steps_to_go - 1] if len(done) >= steps_to_go else None

        return stepped, rng.uniform(0.0, 0.05)

    def entered():  # the moment the trainer marked entering the phase, by its own clock
        moments = [moment for event, name, moment in read_phases(phase_path, offset) if event == "enter" and name == target]
        return moments[0] if moments else None

    # Inside the pause of a write point; within the first 0.8 s of evaluation and export (both last
    # 0.9 s or more here: the evaluation starts with a pause, the export traces and writes a SavedModel).
    if target == "log":
        return entered, rng.uniform(0.0, 0.8 * pause * LOG_PAUSE_FRACTION)
    return entered, rng.uniform(0.0, 0.8 * pause if target.startswith("checkpoint") else 0.8)


def attempt(command, model_dir, phase_path, target, rng, pause, log_path):
    """Runs the command once; kills it at `target` unless it ends first. Returns (killed_phase or None, rc, stdout)."""
    offset = os.path.getsize(phase_path) if os.path.exists(phase_path) else 0
    env = dict(os.environ, **{PHASES_ENV: phase_path, PAUSE_ENV: str(pause)})
    with open(log_path, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
        condition, delay = _kill_trigger(target, phase_path, offset, rng, pause) if target else (None, 0)
        moment = _wait_for(process, condition) if target is not None else None
        if moment is not None:
            time.sleep(max(moment + delay - time.time(), 0.0))
            if process.poll() is None:
                process.kill()
        process.wait()
    with open(log_path) as file:
        output = file.read()
    if process.returncode != -9:
        return None, process.returncode, output
    return _killed_in(read_phases(phase_path, offset)), process.returncode, output


def _killed_in(phases):
    """Where a kill landed, from the phases its attempt marked: an open phase, "step", "start" or "after X"."""
    phase = open_phase(phases)
    if phase is not None:
        return phase
    if not phases:
        return "start"  # importing, locking, loading data, building the model, the first step
    last = phases[-1][1]
    return "step" if last == "log" or last.startswith("checkpoint") else f"after {last}"


def draw_targets(kills, rng):
    """Kill targets: at least 1 of each, at least 3 inside a checkpoint write, training ones first."""
    final = list(FINAL_TARGETS) * max(1, kills // 12)
    training = list(TRAINING_TARGETS) + [f"checkpoint.{point}" for point in CHECKPOINT_POINTS]
    training += [rng.choice(TRAINING_TARGETS) for _ in range(max(0, kills - len(final) - len(training)))]
    rng.shuffle(training)
    return training[: kills - len(final)] + final


def _check_resumed(output, expected_step):
    """The rerun resumed from the latest listed checkpoint (it may have been killed before saying so)."""
    assert "newer checkpoints failed to restore" not in output, output[-2000:]
    match = re.search(r"resuming at step (\d+)", output)
    if match:
        assert int(match.group(1)) == expected_step, (match.group(1), expected_step)
    elif expected_step and "training images" in output:  # the line was printed, without a resume
        raise AssertionError(f"did not resume from step {expected_step}: {output[-2000:]}")


def run_harness(work_dir, data_dir, total_steps, targets, rng, pause=0.3, report=print):
    """Kills a run at each target, completes it, compares it with an uninterrupted run.

    Returns (kills: [(target, phase killed in, latest checkpoint step after the kill)], differences).
    """
    reference_dir, run_dir = os.path.join(work_dir, "reference"), os.path.join(work_dir, "killed")
    reference_command = training_command(data_dir, reference_dir, total_steps, hooks=False)
    reference = subprocess.run(reference_command, capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr[-3000:]
    command = training_command(data_dir, run_dir, total_steps, hooks=True)
    model_dir, phase_path = os.path.join(run_dir, "model"), os.path.join(work_dir, "phases.txt")
    os.makedirs(os.path.join(run_dir, "outputs"), exist_ok=True)
    kills = []
    for index, target in enumerate([*targets, None]):
        expected_step = latest_step(model_dir) if os.path.isdir(model_dir) else 0
        if expected_step == total_steps and target not in (None, "start", "random", *FINAL_TARGETS):
            target = rng.choice(FINAL_TARGETS)  # training is done: only the end of the run is left
        output_path = os.path.join(run_dir, "outputs", f"attempt_{index:02d}.txt")
        phase, returncode, output = attempt(command, model_dir, phase_path, target, rng, pause, output_path)
        _check_resumed(output, expected_step)
        if phase is None:
            assert returncode == 0, output[-3000:]
            if target is not None:
                report(f"attempt {index}: target {target} not reached, the run ended (exit 0)")
            continue
        listed = read_listed_checkpoints(model_dir)  # raises on a half-written listed checkpoint
        kills.append((target, phase, max(listed, default=0)))
        report(f"kill {len(kills)}: target {target}, killed in {phase}, latest checkpoint {kills[-1][2]}")
    return kills, differences(run_dir, reference_dir, total_steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_steps", type=int, default=160)
    parser.add_argument("--pause", type=float, default=0.3, help="seconds of each pause inside a write")
    parser.add_argument("--work_dir", default=None, help="default: a temporary directory, removed afterwards")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(HERE))
    from conftest import make_cifar10_subset

    work_dir = args.work_dir or tempfile.mkdtemp(prefix="kill_harness_")
    data_dir = make_cifar10_subset(os.path.join(work_dir, "data"), 10, 2)  # 100 training, 20 test images
    rng = random.Random(args.seed)
    started = time.time()
    kills, found = run_harness(work_dir, data_dir, args.train_steps, draw_targets(args.kills, rng), rng, args.pause)
    by_phase = {}
    for _, phase, _ in kills:
        by_phase[phase] = by_phase.get(phase, 0) + 1
    in_checkpoint = sum(count for phase, count in by_phase.items() if phase.startswith("checkpoint"))
    print(f"{len(kills)} SIGKILLs survived in {time.time() - started:.0f} s, {in_checkpoint} during a checkpoint write")
    print("killed in: " + ", ".join(f"{phase} {count}" for phase, count in sorted(by_phase.items())))
    print("final run equals the uninterrupted run bit for bit" if not found else "DIFFERENCES:\n" + "\n".join(found))
    if not args.work_dir:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0 if not found else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["train"]:
        train_with_hooks(sys.argv[2:])
    else:
        sys.exit(main())
