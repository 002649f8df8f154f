"""`pretrain(config)`: a whole pretraining run, as `python -m simclr_keras.train` does it, as a library call.

    result = pretrain(TrainConfig(dataset="cifar10", model_dir="runs/q", train_steps=100))
    result = pretrain(TrainConfig.from_run_dir("runs/q").replace(train_steps=200))  # resumes at step 100

Writes into `model_dir` what the command line writes (simclr_keras/runs.py lists the files): checkpoints
(a second call on the same model_dir resumes exactly: weights, optimizer, data order, augmentation),
flags.txt, train_log.jsonl, TensorBoard logs, eval_results.json, training_curves.png and
augmented_pairs.png; with `export_dir`, a TF Serving SavedModel. The run is a few named steps:
devices (strategy, seeds, precision), the run directory and its lock, data, schedule, model, fit
(and why it stopped), the probe's evaluation, export, plots.

Settings that cannot run raise `ConfigError` (a ValueError naming the field and the value received),
before the first step; a file that cannot be written raises `write_failure.WriteFailure`.
TensorFlow loads only once the settings are validated and the run directory is locked.
"""

import dataclasses
import math
import os
import shutil
import sys
import tempfile

from simclr_keras.run_lock import RunLock, RunLockedError
from simclr_keras.train_config import FLAGS_FILE, ConfigError
from simclr_keras.write_failure import WRITE_ERRNOS, WriteFailure, error_reason, reporting_write_failure

FINISHED, STOPPED_BY_SIGNAL, NON_FINITE = "finished", "signal", "non_finite"


@dataclasses.dataclass(frozen=True)
class PretrainResult:
    """What a `pretrain` call did.

    Attributes:
      final_step: the global step training ended at (the checkpoint's step, except after NON_FINITE).
      stop_reason: FINISHED (train_steps reached), STOPPED_BY_SIGNAL (SIGINT/SIGTERM: the checkpoint of
        final_step is saved; no evaluation, export or plots) or NON_FINITE (a NaN/inf loss or weight:
        nothing after the last good checkpoint was saved).
      model_dir, export_dir: the run directory; the exported version's directory (None without export).
      eval_results, eval_results_path: the probe's results and their file (None without eval_split or labels).
      message: for a stopped run, what happened and how to resume; signal_number: the signal's number.
    """

    final_step: int
    stop_reason: str
    model_dir: str
    export_dir: str = None
    eval_results: dict = None
    eval_results_path: str = None
    message: str = ""
    signal_number: int = None


@dataclasses.dataclass
class _Run:
    """What the steps of one run hand each other."""

    strategy: object
    replicas: int
    global_bn: bool
    chief: bool
    output_dir: str  # model_dir, or a scratch directory on multi-worker workers other than the chief
    precision: str
    data: object = None
    schedule: object = None


@dataclasses.dataclass(frozen=True)
class _Data:
    train_images: object
    train_info: object
    train_split: str
    eval_images: object
    eval_info: object


@dataclasses.dataclass(frozen=True)
class _Schedule:
    steps_per_epoch: int
    total_steps: int
    learning_rate: float
    schedule: object


def pretrain(config):
    """Runs (or resumes) the pretraining `config` describes; returns a PretrainResult. See the module docstring."""
    problems = config.validate()
    if problems:
        raise ConfigError(problems)
    # Multi-worker runs lock on the chief only, once the strategy has said which process that is.
    lock = None if config.strategy == "multi_worker" else _lock_run_directory(config.model_dir)
    import keras

    dtype_policy = keras.config.dtype_policy()  # put back afterwards: the caller's session goes on
    try:
        run = _set_up_devices(config)
        if lock is None and run.chief:
            lock = _lock_run_directory(run.output_dir)
        _check_export_dir(config, run.chief)
        run.data = _load_data(config)
        run.schedule = _make_schedule(config, run.data.train_info)
        _check_method_against_replicas(config, run.replicas)
        model, manager, start_step = _build_model(config, run)
        if run.chief:
            _save_run_settings(config, run, model, start_step)
        non_finite, stop_on_signal = _fit(config, run, model, manager, start_step)
        if non_finite.step is not None or stop_on_signal.received is not None:
            return _stopped_result(config, non_finite, stop_on_signal)
        eval_results = _evaluate_probe(config, run, model)
        version_dir = _export(config, run, model)
        if run.chief:
            _write_plots(model, run.data.train_images, run.data.train_info.class_names, run.output_dir, config.seed)
        step = _finish_workers(run, model)
        eval_path = os.path.join(config.model_dir, "eval_results.json") if eval_results else None
        return PretrainResult(step, FINISHED, config.model_dir, version_dir, eval_results, eval_path)
    finally:
        keras.mixed_precision.set_dtype_policy(dtype_policy)
        if lock is not None:
            lock.release()


def _lock_run_directory(model_dir):
    """Takes the run directory's lock (simclr_keras.run_lock): one training process per run.

    Taken before anything in the directory is read or written, and held until the run ends (the
    kernel drops it even on kill -9).
    """
    try:
        os.makedirs(model_dir, exist_ok=True)
        return RunLock(model_dir).acquire()
    except RunLockedError as error:
        raise ConfigError(
            f"model_dir={model_dir} {error.description}; wait for it to end (or stop it), or pass another model_dir."
        ) from error
    except OSError as error:
        raise ConfigError(
            f"model_dir={model_dir} cannot be created or written ({error.strerror}); pass a writable directory."
        ) from error


def _set_up_devices(config):
    """The strategy (first: splitting the CPU must precede any use of a device), seeds, precision, and
    where this process writes."""
    import keras

    from simclr_keras import distribute
    from simclr_keras.models import gradient_cache

    try:
        strategy = distribute.make_strategy(config.strategy, config.tpu, config.cpu_replicas)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ConfigError(f"batch_size={config.batch_size} is not divisible by the {replicas} replicas.")
    try:
        gradient_cache.check_micro_batch_size(config.micro_batch_size, config.batch_size // replicas)
    except ValueError as error:
        raise ConfigError(f"{error} (batch_size={config.batch_size} over {replicas} replica(s))") from error
    chief = distribute.is_chief(strategy)
    # Other multi-worker workers run the same steps but write their outputs to a scratch directory.
    output_dir = config.model_dir if chief else tempfile.mkdtemp(prefix="simclr_worker_")
    keras.utils.set_random_seed(config.seed)
    precision = distribute.resolve_precision(config.precision, strategy)
    keras.mixed_precision.set_dtype_policy(precision)
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):  # creatable is not writable (a read-only mount)
            pass
    except OSError as error:
        raise ConfigError(
            f"model_dir={config.model_dir} cannot be created or written ({error.strerror}); pass a writable directory."
        ) from error
    global_bn = replicas > 1 if config.global_bn is None else config.global_bn
    return _Run(strategy, replicas, global_bn, chief, output_dir, precision)


def _check_export_dir(config, chief):
    """Checked now rather than after a long training run."""
    if config.export_dir and chief:
        try:
            os.makedirs(config.export_dir, exist_ok=True)
        except OSError as error:
            raise ConfigError(
                f"export_dir={config.export_dir} cannot be created ({error.strerror}); pass a writable directory."
            ) from error


def _load_data(config):
    """The training images and, with eval_split and labels, the evaluation images."""
    from simclr_keras import data
    from simclr_keras.cli import warn_about_data

    train_split = config.train_split or data.default_pretraining_split(config.dataset)
    try:
        train_images, train_info = data.load_images(
            config.dataset, train_split, config.image_size, config.data_dir, config.max_train_examples, config.strict_data
        )
        warn_about_data(config.dataset, train_split, train_info)
        eval_images = eval_info = None
        if config.eval_split and train_info.num_classes:
            eval_images, eval_info = data.load_images(
                config.dataset, config.eval_split, config.image_size, config.data_dir, strict=config.strict_data
            )
            warn_about_data(config.dataset, config.eval_split, eval_info)
    except data.DatasetNotFoundError as error:  # InvalidImageError (strict_data) included
        raise ConfigError(str(error)) from error
    return _Data(train_images, train_info, train_split, eval_images, eval_info)


def _make_schedule(config, train_info):
    from simclr_keras import optimizers

    steps_per_epoch = train_info.num_examples // config.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(f"batch_size={config.batch_size} exceeds the {train_info.num_examples} training images.")
    total_steps = config.train_steps if config.train_steps > 0 else config.train_epochs * steps_per_epoch
    # Scaling uses the global batch: all replicas together take one step on it.
    learning_rate = optimizers.scale_learning_rate(config.learning_rate, config.batch_size, config.lr_scaling)
    # A run shorter than its warm-up (a smoke test, train_steps=3) warms up over the whole run.
    warmup_steps = min(int(round(config.warmup_epochs * steps_per_epoch)), total_steps)
    schedule = optimizers.build_schedule(config.lr_schedule, learning_rate, total_steps, warmup_steps)
    return _Schedule(steps_per_epoch, total_steps, learning_rate, schedule)


def _check_method_against_replicas(config, replicas):
    """MoCo's BatchNorm groups and queue against the images each replica encodes per step."""
    if config.method != "moco_v2":
        return
    per_replica = config.batch_size // replicas
    if per_replica % config.moco_bn_splits:
        raise ConfigError(
            f"moco_bn_splits={config.moco_bn_splits} must divide the {per_replica} images of each view that "
            "each replica encodes per step (batch_size / replicas)."
        )
    keys_per_step = per_replica * (2 if config.moco_symmetric else 1) * replicas
    if config.moco_queue_size < keys_per_step:
        raise ConfigError(f"moco_queue_size={config.moco_queue_size} is smaller than the {keys_per_step} keys of one step.")


def _build_model(config, run):
    """The compiled model, its checkpoint manager, and the step it resumes at (0 for a fresh run)."""
    from simclr_keras import optimizers, runs
    from simclr_keras.model_config import build_model

    settings = config.model_config(run.data.train_info.num_classes, run.global_bn)
    with run.strategy.scope():
        model = build_model(settings)
        optimizer = optimizers.build_optimizer(
            config.optimizer, run.schedule.schedule, config.weight_decay, config.momentum, nesterov=config.nesterov is not False
        )
        model.compile(optimizer=optimizer)  # which keeps the probe out of LARS' trust ratio, as the official code
        save_dir = None if run.chief else os.path.join(run.output_dir, runs.CHECKPOINTS)
        try:
            manager, start_step = runs.make_checkpoint_manager(model, config.model_dir, save_dir=save_dir)
        except ValueError as error:
            raise ConfigError(
                f"model_dir={config.model_dir} cannot be resumed with these settings: {error}. Use the settings of "
                f"that run (MODEL_DIR/{FLAGS_FILE}: TrainConfig.from_run_dir, or --flagfile) or a new model_dir."
            ) from error
    return model, manager, start_step


def _save_run_settings(config, run, model, start_step):
    """model_config.json, classes.json and flags.txt; then the run's one-paragraph summary."""
    from simclr_keras import runs

    with reporting_write_failure(f"the run's settings (model_config.json, classes.json, {FLAGS_FILE})", run.output_dir):
        runs.save_model_config(model, run.output_dir)
        runs.save_class_names(run.data.train_info.class_names, run.output_dir, config.dataset)
        with open(os.path.join(run.output_dir, FLAGS_FILE), "w", encoding="utf-8") as file:
            file.write("\n".join(config.flag_lines()) + "\n")
    info, schedule = run.data.train_info, run.schedule
    print(
        f"{info.num_examples} training images ({config.dataset}:{run.data.train_split}), {schedule.steps_per_epoch} "
        f"steps per epoch, {schedule.total_steps} steps, learning rate {schedule.learning_rate:g}, {run.replicas} "
        f"replica(s), {run.precision}"
        + (", global BatchNorm" if run.global_bn else "")
        + (f", resuming at step {start_step}" if start_step else "")
    )
    print(
        f"logged loss: the paper's (mean over the anchors); optimised objective: {model.objective_scale:g} x it "
        "(the reference code's)"
    )


def _knn_monitor(config, num_classes, steps_per_epoch):
    """[KnnMonitor] with knn_every_n_epochs, else []: kNN of knn_subset eval-split images against as
    many labelled `train` images (knn_memory=train: all of them, up to max_train_examples), voting
    with knn_temperature."""
    if not config.knn_every_n_epochs:
        return []
    from simclr_keras import knn_monitor

    if not num_classes:
        raise ConfigError(
            f"knn_every_n_epochs={config.knn_every_n_epochs} needs labelled images; dataset={config.dataset} has none."
        )
    try:
        memory_size = config.max_train_examples if config.knn_memory == "train" else config.knn_subset  # 0: all
        memory, memory_labels, queries, query_labels, classes = knn_monitor.load_subsets(
            config.dataset, "train", config.eval_split, config.image_size, config.data_dir, config.knn_subset,
            config.strict_data, memory_size=memory_size,
        )  # fmt: skip
    except ValueError as error:  # DatasetNotFoundError included
        raise ConfigError(f"knn_every_n_epochs: {error}") from error
    return [
        knn_monitor.KnnMonitor(
            memory, memory_labels, queries, query_labels, steps_per_epoch, config.knn_every_n_epochs, classes,
            temperature=config.knn_temperature, batch_size=config.eval_batch_size,
        )
    ]  # fmt: skip


def _fit(config, run, model, manager, start_step):
    """Trains from start_step to total_steps; returns the (StopOnNonFinite, StopOnSignal) callbacks that say
    whether and why fit stopped early."""
    from simclr_keras import callbacks, data

    # Outside fit: SIGINT/SIGTERM end the run at once (nothing is lost before the first step).
    non_finite, stop_on_signal = callbacks.StopOnNonFinite(), callbacks.StopOnSignal()
    schedule, tensorboard = run.schedule, os.path.join(run.output_dir, "tensorboard")
    if start_step >= schedule.total_steps:
        return non_finite, stop_on_signal
    batches = data.training_batches(
        run.data.train_images, run.data.train_info, config.batch_size, config.image_size, seed=config.seed,
        start_step=start_step,
    )  # fmt: skip
    # The kNN monitor first: it adds its value to the logs that StepLogger writes.
    fit_callbacks = _knn_monitor(config, run.data.train_info.num_classes, schedule.steps_per_epoch) + [
        callbacks.StepLogger(os.path.join(run.output_dir, "train_log.jsonl"), tensorboard, start_step),
        non_finite,  # before the checkpoint callback, so that a non-finite step is never saved
        stop_on_signal,
        callbacks.CheckpointEveryNSteps(manager, config.checkpoint_every_n_steps, non_finite),
        callbacks.StopAtStep(schedule.total_steps),
    ]
    if config.profile_steps:
        fit_callbacks.append(callbacks.ProfileSteps(tensorboard, *map(int, config.profile_steps)))
    model.fit(
        batches,
        epochs=math.ceil(schedule.total_steps / schedule.steps_per_epoch),
        initial_epoch=start_step // schedule.steps_per_epoch,
        steps_per_epoch=schedule.steps_per_epoch,
        callbacks=fit_callbacks,
        shuffle=False,  # the stream is already shuffled; Keras would only warn
        verbose="auto" if run.chief else 0,
    )
    return non_finite, stop_on_signal


def _stopped_result(config, non_finite, stop_on_signal):
    """The PretrainResult of a run that fit stopped early (a non-finite value first: it is the worse news)."""
    import tensorflow as tf

    from simclr_keras import runs

    checkpoint_dir = os.path.join(config.model_dir, runs.CHECKPOINTS)
    if non_finite.step is not None:
        latest = tf.train.latest_checkpoint(checkpoint_dir)
        kept = f"the last checkpoint (step {latest.rsplit('-', 1)[-1]}) is kept" if latest else "no checkpoint was written"
        message = (
            f"non-finite {non_finite.reason} at step {non_finite.step}; {kept}. Lower learning_rate "
            "(or use precision=float32) and rerun to resume from it."
        )
        return PretrainResult(non_finite.step, NON_FINITE, config.model_dir, message=message)
    message = (
        f"stopped by {stop_on_signal.signal_name} at step {stop_on_signal.step}; the checkpoint of that step is in "
        f"{checkpoint_dir}."
    )
    return PretrainResult(
        stop_on_signal.step, STOPPED_BY_SIGNAL, config.model_dir, message=message, signal_number=stop_on_signal.received
    )


def _evaluate_probe(config, run, model):
    """The online probe's results on the evaluation split, written to eval_results.json; None without one."""
    if run.data.eval_images is None:
        return None
    import numpy as np

    from simclr_keras import data, runs

    eval_info = run.data.eval_info
    results = model.evaluate(
        data.evaluation_batches(run.data.eval_images, eval_info, config.eval_batch_size, config.image_size),
        return_dict=True,
        verbose=0,
    )
    results = {
        "split": config.eval_split,
        "num_examples": eval_info.num_examples,
        "step": int(model.optimizer.iterations.numpy()),
        **{name: float(np.mean(value)) for name, value in results.items()},
    }
    with reporting_write_failure("the evaluation results", os.path.join(run.output_dir, runs.EVAL_RESULTS)):
        runs.save_eval_results(results, run.output_dir)
    if run.chief:
        print(
            f"online linear probe on {config.dataset}:{config.eval_split} ({eval_info.num_examples} images): "
            f"top-1 accuracy {results['probe_accuracy']:.4f}"
        )
    return results


def _export(config, run, model):
    """The export's version directory (None without export_dir)."""
    if not config.export_dir:
        return None
    from simclr_keras import export

    # Every worker saves (saving may need collective ops); the others into their scratch space.
    with reporting_write_failure("the export", config.export_dir):
        version_dir = export.export_encoder(model, config.export_dir if run.chief else os.path.join(run.output_dir, "export"))
    if run.chief:
        print(f"exported the encoder to {version_dir}")
        return version_dir
    return None


def _write_plots(model, train_images, class_names, output_dir, seed):
    """Writes training_curves.png and augmented_pairs.png into the run directory.

    Called once the final checkpoint (and export) is written, so that a picture never costs the run: a
    failure only warns, except a location that cannot take the files (a full disk, no permission),
    which raises WriteFailure, as for every other file of the run.
    """
    try:
        from simclr_keras import plots

        # The first 8 training images (for folders one per class: files are listed round-robin).
        images, labels = next(iter(train_images.take(8).batch(8)))  # uint8 [8, S, S, 3], int64 [8]
        captions = [class_names[label] if 0 <= label < len(class_names) else "" for label in labels.numpy()]
        written = plots.write_run_plots(output_dir, model.augmenter, images.numpy(), captions, seed)
        print(f"plots: {', '.join(sorted(written))} in {output_dir}")
    except Exception as error:  # matplotlib, fonts: none of them may fail a finished run
        if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
            raise WriteFailure("the plots", output_dir, error_reason(error)) from error
        print(f"warning: the plots were not written ({type(error).__name__}: {error})", file=sys.stderr)


def _finish_workers(run, model):
    """The final global step; on multi-worker runs, each worker's weight fingerprint, and the scratch space removed."""
    import numpy as np
    import tensorflow as tf

    if isinstance(run.strategy, tf.distribute.MultiWorkerMirroredStrategy):
        # Synchronous training keeps every worker's weights identical; this line lets anyone check.
        fingerprint = sum(float(np.sum(np.square(w))) for w in model.get_weights())
        print(f"worker {run.strategy.cluster_resolver.task_id}: sum of squared weights {fingerprint:.10e}")
    if not run.chief:
        shutil.rmtree(run.output_dir, ignore_errors=True)
    return int(model.optimizer.iterations.numpy())
