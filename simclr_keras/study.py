"""Run a study: every (variation, seed) of a study file as a training run, evaluated, summarised.

    python -m simclr_keras.study studies/paper_temperature.toml --dry_run   # the runs and their cost
    python -m simclr_keras.study studies/paper_temperature.toml --max_hours=2
    python -m simclr_keras.study studies/paper_temperature.toml --report_only

Each run is an ordinary `python -m simclr_keras.train --flagfile=BASE <study flags> <variation flags>
--seed=S --model_dir=RUNS_DIR/VARIATION/seed_S` subprocess (so checkpoints, resuming and the signal
checkpoint are the command line's), then `python -m simclr_keras.evaluate --protocol=P --model_dir=...`
for each evaluation (the probe is read from the run's eval_results.json). The runner keeps
MODEL_DIR/study_run.json (the flags, the accumulated training seconds, whether training finished, each
evaluation's result) and appends one line per finished run to STUDY_DIR/results/NAME.jsonl (settings,
seed, metrics, times, package version and git commit). A run with a line there is skipped, so a study
resumes across interruptions, and on another machine from a committed results file. At the end (and
after a stop) STUDY_DIR/NAME.md and NAME.png are written from that file (simclr_keras.study_report).

--max_hours stops between runs once that much time has passed; a training still running then gets
SIGTERM, which the training command turns into a checkpoint: the next invocation resumes it. SIGINT or
SIGTERM to the runner do the same at once. The study file format: simclr_keras.study_spec.
"""

import datetime
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

from absl import app, flags, logging

from simclr_keras import study_report
from simclr_keras.cli import fail
from simclr_keras.study_spec import load_study

FLAGS = flags.FLAGS

flags.DEFINE_bool("dry_run", False, "Print the runs, what is done, and the estimated cost of the rest; run nothing.")
flags.DEFINE_float("max_hours", 0.0, "Stop cleanly after this many hours (a running training checkpoints); 0: no limit.")
flags.DEFINE_bool("report_only", False, "Only rewrite the report and figure from the results file.")
flags.DEFINE_string("runs_dir", None, "Directory of the study's runs; default: the study file's runs_dir.")

TRAIN_MODULE, EVALUATE_MODULE = "simclr_keras.train", "simclr_keras.evaluate"
RUN_STATE = "study_run.json"
# Flags the runner sets itself, per run and per evaluation.
RUNNER_TRAIN_FLAGS = {"seed", "model_dir", "flagfile"}
RUNNER_EVALUATE_FLAGS = {"protocol", "model_dir", "encoder", "output", "seed"}
# Training images of the default split of the TFDS datasets (for the cost estimate).
TFDS_TRAIN_IMAGES = {"cifar10": 50000, "cifar100": 50000, "stl10": 105000, "imagenet2012": 1281167}
# Grace for a training to write its checkpoint after SIGTERM, before it is killed.
STOP_GRACE_SECONDS = 900


# --------------------------------------------------------------------------------------
# Flags: the command lines' definitions and a run's effective values
# --------------------------------------------------------------------------------------

_LIST_FLAGS = """
import json, sys, types
package = types.ModuleType("simclr_keras")  # the package's __init__ imports TensorFlow; the flags do not need it
package.__path__ = [sys.argv[1]]
sys.modules["simclr_keras"] = package
import importlib
module = importlib.import_module(sys.argv[2])
getattr(module, "define_flags", lambda: None)()  # a module that defines its flags only when it runs
from absl import flags
print(json.dumps({name: flags.FLAGS[name].default for name in flags.FLAGS}, default=str))
"""


def cli_flag_defaults(module):
    """{flag name: default} of a command-line module, read in a subprocess (absl flags are global)."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run(
        [sys.executable, "-c", _LIST_FLAGS, package_dir, module], capture_output=True, text=True, timeout=120
    )
    if result.returncode:
        raise RuntimeError(f"could not list the flags of {module}: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _split_flag(argument):
    name, _, value = argument.lstrip("-").partition("=")
    return name, (value if "=" in argument else None)


def expand_flagfiles(arguments, depth=0):
    """The arguments with every --flagfile=PATH replaced by that file's lines (# and // comments skipped)."""
    expanded = []
    for argument in arguments:
        name, value = _split_flag(argument)
        if name != "flagfile":
            expanded.append(argument)
            continue
        if depth > 10 or not value or not os.path.isfile(value):
            raise ValueError(f"--flagfile={value} is not a readable file (paths are relative to {os.getcwd()}).")
        with open(value, encoding="utf-8") as file:
            lines = [line.strip() for line in file]
        lines = [line for line in lines if line and not line.startswith(("#", "//"))]
        expanded += expand_flagfiles(lines, depth + 1)
    return expanded


def flag_values(arguments, defaults):
    """{name: value string} after `arguments` on top of `defaults` (the last setting wins, as absl)."""
    values = {name: (None if default is None else str(default)) for name, default in defaults.items()}
    for argument in expand_flagfiles(arguments):
        name, value = _split_flag(argument)
        if value is None and name.startswith("no") and name[2:] in defaults and name not in defaults:
            name, value = name[2:], "false"
        values[name] = "true" if value is None else value
    return values


def check_flags(arguments, defined, forbidden, where, module):
    """Raises ValueError for a flag `module` does not define, or one the runner sets itself."""
    for argument in expand_flagfiles(arguments):
        name, value = _split_flag(argument)
        if value is None and name.startswith("no") and name not in defined:
            name = name[2:]
        if name in forbidden:
            raise ValueError(f"{where} sets --{name}, which the study runner sets itself for each run; remove it.")
        if name not in defined:
            raise ValueError(
                f"{where} sets --{name}, which `python -m {module}` does not define (see its --helpfull); "
                "remove it or add the flag first."
            )


# --------------------------------------------------------------------------------------
# Runs, their state files and the results file
# --------------------------------------------------------------------------------------


class Run:
    """One (variation, seed) of a study, trained in its own model_dir."""

    def __init__(self, study, variation, seed, runs_dir):
        self.study, self.variation, self.seed = study, variation, seed
        self.model_dir = os.path.join(runs_dir, variation.name, f"seed_{seed}")
        self.flags = list(study_report.variation_flags(study, variation))
        base = [f"--flagfile={study.base_flagfile}"] if study.base_flagfile else []
        # Recorded in the run's state and the results: what distinguishes this run (not where it ran).
        self.train_flags = [*base, *self.flags, f"--seed={seed}"]

    @property
    def label(self):
        return f"{self.variation.name} seed {self.seed}"

    def state_path(self):
        return os.path.join(self.model_dir, RUN_STATE)

    def read_state(self):
        """The run's study_run.json, or a fresh one; raises ValueError if it was trained with other flags."""
        state = {"train_flags": self.train_flags, "train_seconds": 0.0, "finished": False, "evaluations": {}}
        if os.path.isfile(self.state_path()):
            with open(self.state_path(), encoding="utf-8") as file:
                state = json.load(file)
            if state["train_flags"] != self.train_flags:
                raise ValueError(
                    f"{self.model_dir} was trained with {state['train_flags']}, but the study now runs it with "
                    f"{self.train_flags}; delete that directory or give the variation a new name."
                )
        return state

    def write_state(self, state):
        os.makedirs(self.model_dir, exist_ok=True)
        temporary = self.state_path() + ".tmp"
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(state, file, indent=1)
        os.replace(temporary, self.state_path())  # a kill leaves the old state or the new one

    def logged_steps(self):
        """(last step, [times]) of the run's train_log.jsonl; (0, []) before its first step."""
        path = os.path.join(self.model_dir, "train_log.jsonl")
        if not os.path.isfile(path):
            return 0, []
        times, last = [], 0
        with open(path, encoding="utf-8") as file:
            for line in file:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
                last = max(last, int(record["step"]))
                times.append(float(record["time"]))
        return last, times


def plan_runs(study, runs_dir):
    return [Run(study, variation, seed, runs_dir) for variation in study.variations for seed in study.seeds]


def read_results(path):
    """The records of a results file (a line cut short by a kill is skipped)."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path, encoding="utf-8") as file:
        for line in file:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def finished_keys(study, records):
    """{(variation, seed)} of the runs the results file holds as the study now describes them
    (`study_report.record_counts`: the report counts the same records)."""
    return set(study_report.counted_records(study, records))


def is_recorded(run, keys):
    return (run.variation.name, run.seed) in keys


def _git(*arguments, strip=True):
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        result = subprocess.run(["git", "-C", repository, *arguments], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode:
        return None
    return result.stdout.decode("utf-8", "replace").strip() if strip else result.stdout


def provenance():
    """{"version", "commit", "dirty", "diff_sha256"} of the code that ran.

    With uncommitted changes to tracked files, diff_sha256 is the SHA-256 of `git diff HEAD --binary`
    (staged and unstaged), so that a run can be tied to a saved patch; None when clean or unknown.
    """
    try:
        from importlib.metadata import version

        package_version = version("simclr_keras")
    except Exception:  # not installed: the source tree's own
        package_version = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    diff = _git("diff", "HEAD", "--binary", strip=False) if status else None  # the bytes `| sha256sum` reads
    return {
        "version": package_version,
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(status) if status is not None else None,
        "diff_sha256": hashlib.sha256(diff).hexdigest() if diff else None,
    }


def read_run_settings(model_dir):
    """{flag: value} of the run's flags.txt (every flag the training used)."""
    path = os.path.join(model_dir, "flags.txt")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as file:
        arguments = [line.strip() for line in file if line.strip()]
    return dict(study_report.flag_setting(argument) for argument in arguments)  # absl writes booleans as --x, --nox


# --------------------------------------------------------------------------------------
# Cost estimate
# --------------------------------------------------------------------------------------


def training_images(values):
    """Training images of a run's effective flags, or None when the runner cannot tell."""
    dataset, count = values.get("dataset") or "", None
    if dataset.startswith("folder:"):
        train_dir = os.path.join(dataset[len("folder:"):], "train")
        if os.path.isdir(train_dir):
            count = sum(len(files) for _, _, files in os.walk(train_dir))
    elif not values.get("train_split"):
        count = TFDS_TRAIN_IMAGES.get(dataset)
    limit = int(values.get("max_train_examples") or 0)
    return min(count, limit) if count and limit else count or limit or None


def total_steps(values):
    """The run's optimizer steps (--train_steps, or epochs x steps per epoch), or None if unknown."""
    if int(values.get("train_steps") or 0) > 0:
        return int(values["train_steps"])
    images = training_images(values)
    if images is None:
        return None
    return int(values["train_epochs"]) * (images // int(values["batch_size"]))


def measured_seconds_per_step(runs):
    """(median seconds per step, run label) from the first of `runs` whose log has 4+ steps, else (None, None).

    The first two steps are left out: they include tracing and compilation.
    """
    for run in runs:
        _, times = run.logged_steps()
        gaps = sorted(later - earlier for earlier, later in zip(times[2:], times[3:]) if later > earlier)
        if gaps:
            return gaps[len(gaps) // 2], run.label
    return None, None


def estimate(run, values, runs_of_variation, evaluation_seconds):
    """(seconds left, steps done, total steps, how) of a run not yet recorded in the results."""
    steps = total_steps(values)
    done, _ = run.logged_steps()
    seconds_per_step, source = measured_seconds_per_step(runs_of_variation)
    if seconds_per_step is not None:
        how = f"measured {seconds_per_step:.3f} s/step ({source})"
    else:
        speed = run.variation.images_per_second or run.study.images_per_second
        seconds_per_step = int(values["batch_size"]) / speed
        how = f"configured {speed:g} images/s x {values['batch_size']} images/step"
    state = run.read_state()
    seconds = 0.0
    if not state["finished"]:
        remaining = max((steps or 0) - done, 0)
        seconds += run.study.overhead_seconds + remaining * seconds_per_step
    for evaluation in run.study.evaluations:
        if evaluation.applies_to(run.variation.name) and evaluation.name not in state["evaluations"]:
            if evaluation.protocol != "probe":
                seconds += run.study.overhead_seconds + evaluation_seconds.get(evaluation.name, evaluation.seconds)
    return seconds, done, steps, how


def measured_evaluation_seconds(runs):
    """{evaluation name: seconds} of the first run that has each evaluation (the command's own timing)."""
    seconds = {}
    for run in runs:
        if os.path.isfile(run.state_path()):
            for name, result in run.read_state()["evaluations"].items():
                seconds.setdefault(name, result.get("seconds"))
    return {name: value for name, value in seconds.items() if value is not None}


def _duration(seconds):
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.2f} h"


def print_plan(study, runs, keys, train_defaults):
    """The --dry_run table: each run's status and estimated remaining cost, and the total."""
    evaluation_seconds = measured_evaluation_seconds(runs)
    print(
        f"study {study.name}: {len(study.variations)} variations x {len(study.seeds)} seeds = {len(runs)} runs; "
        f"evaluations: {', '.join(f'{e.name} ({e.protocol})' for e in study.evaluations)}"
    )
    print(f"{'variation':<28} {'seed':>4}  {'status':<22} {'steps':>11}  {'estimate':>9}  how")
    total = 0.0
    for run in runs:
        values = flag_values(run.train_flags, train_defaults)
        if is_recorded(run, keys):
            print(f"{run.variation.name:<28} {run.seed:>4}  {'done (in results)':<22}")
            continue
        same_variation = [other for other in runs if other.variation is run.variation]
        seconds, done, steps, how = estimate(run, values, same_variation, evaluation_seconds)
        state = run.read_state()
        status = "to evaluate" if state["finished"] else f"resume at step {done}" if done else "to train"
        total += seconds
        step_text = f"{done}/{steps if steps is not None else '?'}"
        print(f"{run.variation.name:<28} {run.seed:>4}  {status:<22} {step_text:>11}  {_duration(seconds):>9}  {how}")
    print(
        f"estimated time left: {_duration(total)} (training: steps x seconds per step, measured from a run's "
        f"train_log.jsonl when one has 4+ steps, else configured; evaluations: measured or configured; "
        f"plus {study.overhead_seconds:g} s start-up per command)"
    )
    return total


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------


class Stopper:
    """When to stop: the --max_hours deadline, or SIGINT / SIGTERM to the runner."""

    def __init__(self, max_hours):
        self.deadline = time.time() + max_hours * 3600 if max_hours > 0 else None
        self.signal_name = None

    def install(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def reason(self):
        if self.signal_name:
            return self.signal_name
        if self.deadline is not None and time.time() >= self.deadline:
            return "--max_hours"
        return None


def run_command(command, log_path, stopper):
    """Runs `command` with its output in `log_path`; returns (exit status, seconds, stopped).

    The child has its own session, so a Ctrl-C reaches only the runner, which passes on exactly one
    SIGTERM (a second one would end the training before its checkpoint).
    """
    started = time.time()
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(command)}\n".encode())
        log.flush()
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        stopped = False
        while True:
            try:
                status = child.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                pass
            if not stopped and stopper.reason():
                child.send_signal(signal.SIGTERM)
                stopped, stop_time = True, time.time()
            if stopped and time.time() - stop_time > STOP_GRACE_SECONDS:
                child.kill()
    return status, time.time() - started, stopped


def _tail(path, lines=15):
    with open(path, encoding="utf-8", errors="replace") as file:
        return "".join(file.readlines()[-lines:])


def train(run, state, stopper):
    """Trains (or resumes) the run; returns True once its training has finished."""
    command = [sys.executable, "-m", TRAIN_MODULE, *run.train_flags, f"--model_dir={run.model_dir}"]
    state["finished"] = False
    run.write_state(state)
    log_path = os.path.join(run.model_dir, "study_train.log")
    status, seconds, stopped = run_command(command, log_path, stopper)
    state["train_seconds"] += seconds
    if status == 0:
        state["finished"], state["steps"] = True, run.logged_steps()[0]
    run.write_state(state)
    if status and not stopped:
        print(f"  training failed (exit status {status}); the end of {log_path}:\n{_tail(log_path)}", file=sys.stderr)
    return status == 0


def evaluate(run, evaluation, state, stopper):
    """Runs one evaluation of a trained run; returns {"top1", "top5", "seconds", "flags"} or None."""
    if evaluation.protocol == "probe":
        path = os.path.join(run.model_dir, "eval_results.json")
        if not os.path.isfile(path):
            print(f"  {evaluation.name}: {path} is missing; the probe needs a training --eval_split.", file=sys.stderr)
            return None
        with open(path, encoding="utf-8") as file:
            probe = json.load(file)
        return {"top1": probe["probe_accuracy"], "top5": None, "seconds": 0.0, "flags": []}
    settings = read_run_settings(run.model_dir)
    data_flags = [f"--dataset={settings['dataset']}"] + ([f"--data_dir={settings['data_dir']}"] if settings.get("data_dir") else [])
    output = os.path.join(run.model_dir, f"study_eval_{evaluation.name}.json")
    evaluation_flags = [f"--protocol={evaluation.protocol}", *data_flags, *evaluation.flags, f"--seed={run.seed}"]
    command = [
        sys.executable, "-m", EVALUATE_MODULE, *evaluation_flags, f"--model_dir={run.model_dir}", f"--output={output}",
    ]  # fmt: skip
    log_path = os.path.join(run.model_dir, f"study_eval_{evaluation.name}.log")
    status, seconds, stopped = run_command(command, log_path, stopper)
    if status:
        if not stopped:
            print(f"  {evaluation.name} failed (exit status {status}); the end of {log_path}:\n{_tail(log_path)}", file=sys.stderr)
        return None
    with open(output, encoding="utf-8") as file:
        result = json.load(file)
    return {"top1": result["top1"], "top5": result["top5"], "seconds": round(seconds, 1), "flags": evaluation_flags}


def result_record(run, state):
    metrics = {}
    for name, result in state["evaluations"].items():
        metrics[f"{name}_top1"], metrics[f"{name}_top5"] = result["top1"], result["top5"]
    evaluation_seconds = {name: result["seconds"] for name, result in state["evaluations"].items()}
    return {
        "study": run.study.name,
        "variation": run.variation.name,
        "seed": run.seed,
        "flags": run.flags,
        "train_flags": run.train_flags,
        "settings": read_run_settings(run.model_dir),
        "metrics": metrics,
        "train_seconds": round(state["train_seconds"], 1),
        "evaluation_seconds": evaluation_seconds,
        "wall_seconds": round(state["train_seconds"] + sum(evaluation_seconds.values()), 1),
        "steps": state.get("steps"),
        "model_dir": run.model_dir,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": os.uname().nodename,
        **provenance(),
    }


def append_result(path, record):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")


def complete_run(run, stopper):
    """Trains and evaluates one run as far as it goes; returns "done", "stopped" or "failed"."""
    state = run.read_state()
    if not state["finished"]:
        print(f"{run.label}: training in {run.model_dir}", flush=True)
        if not train(run, state, stopper):
            return "stopped" if stopper.reason() else "failed"
    for evaluation in run.study.evaluations:
        if not evaluation.applies_to(run.variation.name) or evaluation.name in state["evaluations"]:
            continue
        if stopper.reason():
            return "stopped"
        print(f"{run.label}: {evaluation.name} ({evaluation.protocol})", flush=True)
        result = evaluate(run, evaluation, state, stopper)
        if result is None:
            return "stopped" if stopper.reason() else "failed"
        state["evaluations"][evaluation.name] = result
        run.write_state(state)
    append_result(run.study.results_path, result_record(run, state))
    metrics = ", ".join(f"{name} {result['top1']:.4f}" for name, result in state["evaluations"].items())
    print(f"{run.label}: done in {state['train_seconds'] / 60:.1f} min of training; top-1 {metrics}", flush=True)
    return "done"


def run_study(study, runs, stopper):
    """Completes the runs not yet in the results file, in order, until all are done or a stop.

    Returns (runs completed now, runs failed, stop reason or None).
    """
    completed, failed = 0, []
    for run in runs:
        if is_recorded(run, finished_keys(study, read_results(study.results_path))):
            continue
        if stopper.reason():
            return completed, failed, stopper.reason()
        outcome = complete_run(run, stopper)
        if outcome == "done":
            completed += 1
        elif outcome == "failed":
            failed.append(run.label)
        else:
            return completed, failed, stopper.reason()
    return completed, failed, None


def check_study_flags(study, train_defaults, evaluate_defaults):
    if study.base_flagfile:
        check_flags([f"--flagfile={study.base_flagfile}"], train_defaults, {"seed", "model_dir"}, "the base flagfile", TRAIN_MODULE)
    check_flags(study.flags, train_defaults, RUNNER_TRAIN_FLAGS, "[study] flags", TRAIN_MODULE)
    for variation in study.variations:
        check_flags(variation.flags, train_defaults, RUNNER_TRAIN_FLAGS, f"variation {variation.name!r}", TRAIN_MODULE)
    for evaluation in study.evaluations:
        where = f"evaluation {evaluation.name!r}"
        check_flags(evaluation.flags, evaluate_defaults, RUNNER_EVALUATE_FLAGS, where, EVALUATE_MODULE)


def main(argv):
    logging.set_verbosity(logging.WARNING)
    if len(argv) != 2:
        fail(f"pass one study file, e.g. python -m simclr_keras.study studies/paper_temperature.toml; got {argv[1:]}.")
    if FLAGS.max_hours < 0:
        fail(f"--max_hours must be >= 0 (0: no limit), got {FLAGS.max_hours}.")
    try:
        study = load_study(argv[1])
    except (OSError, ValueError) as error:
        fail(f"{argv[1]}: {error}")
    runs = plan_runs(study, FLAGS.runs_dir or study.runs_dir)
    if FLAGS.report_only:
        print("wrote " + " and ".join(study_report.write_report(study, read_results(study.results_path))))
        return
    try:
        train_defaults = cli_flag_defaults(TRAIN_MODULE)
        check_study_flags(study, train_defaults, cli_flag_defaults(EVALUATE_MODULE))
        keys = finished_keys(study, read_results(study.results_path))
        if FLAGS.dry_run:
            print_plan(study, runs, keys, train_defaults)
            return
        for run in runs:
            if not is_recorded(run, keys):
                run.read_state()  # a run directory trained with other flags stops the study here
    except ValueError as error:
        fail(f"{argv[1]}: {error}")
    stopper = Stopper(FLAGS.max_hours)
    stopper.install()
    completed, failed, stop_reason = run_study(study, runs, stopper)
    records = read_results(study.results_path)
    remaining = sum(not is_recorded(run, finished_keys(study, records)) for run in runs)
    report, figure = study_report.write_report(study, records)
    print(f"{completed} run(s) completed now, {remaining} of {len(runs)} left; wrote {report} and {figure}")
    if stop_reason:
        print(f"stopped by {stop_reason}; rerun the same command to resume.")
    if failed:
        fail(f"{len(failed)} run(s) failed: {', '.join(failed)} (their logs are in their model_dir).")


if __name__ == "__main__":
    app.run(main)
