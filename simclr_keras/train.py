"""Pretrain a SimCLR encoder from the command line.

    python -m simclr_keras.train --flagfile=configs/cifar10.flags --model_dir=runs/cifar10
    python -m simclr_keras.train --flagfile=configs/quickstart.flags \
        --dataset=folder:../shared/datasets/cifar10 --model_dir=runs/quickstart

Writes to --model_dir: checkpoints (re-running with the same model_dir resumes), flags.txt (the flags
used, re-usable as a --flagfile), train_log.jsonl (one JSON object per step), TensorBoard logs in
tensorboard/, and eval_results.json (the online linear probe on the evaluation split). With --export_dir,
the encoder is then exported as a TF Serving SavedModel (see simclr_keras.export). Last come two
pictures (simclr_keras.plots): training_curves.png and augmented_pairs.png.
"""

import math
import os
import shutil
import sys
import tempfile

from absl import app, flags, logging

from simclr_keras.cli import fail
from simclr_keras.cli import reject_positional_arguments
from simclr_keras.cli import warn_about_data
from simclr_keras.run_lock import RunLock, RunLockedError
from simclr_keras.write_failure import WRITE_ERRNOS, WriteFailure, error_reason, reporting_write_failure, stop_message

FLAGS = flags.FLAGS

# Data
flags.DEFINE_string("dataset", "cifar10", "cifar10, cifar100, stl10, imagenet2012 (TFDS) or folder:DIR.")
flags.DEFINE_string("data_dir", None, "TFDS data directory holding prepared datasets.")
flags.DEFINE_string("train_split", "", "Pretraining split; empty: train (+unlabelled where the dataset has it).")
flags.DEFINE_string("eval_split", "test", "Split the online probe is evaluated on after training; empty: none.")
flags.DEFINE_integer("max_train_examples", 0, "Use only the first N training images (class-balanced for folders); 0: all.")
flags.DEFINE_integer("image_size", 32, "Side of the square views fed to the encoder, in pixels.")
flags.DEFINE_integer("seed", 0, "Seed of data order, augmentation and initialisation.")
flags.DEFINE_bool("strict_data", False, "Stop on an image-folder file that does not decode, instead of skipping it with a warning.")
# Model
flags.DEFINE_enum("backbone", "resnet18", ["resnet18", "resnet34", "resnet50"], "Encoder f.")
flags.DEFINE_float("width_multiplier", 1.0, "Channel width multiplier of the ResNet.")
flags.DEFINE_bool(
    "zero_init_residual", True,
    "Start the last BatchNorm gamma of every residual block at 0, as the official ResNet (init_zero); False: at 1.",
)
flags.DEFINE_integer("proj_layers", 2, "Projection head depth: 2 = SimCLR v1, 3 = SimCLR v2.")
flags.DEFINE_integer("proj_dim", 128, "Output dimension of the projection head.")
flags.DEFINE_enum(
    "proj_batch_norm", None, ["all", "hidden", "none"],
    "Head layers followed by BatchNorm (a bias where none is): all = SimCLR (default for simclr), hidden = "
    "the debiased/HCL reference code, none = MoCo v2's Linear-ReLU-Linear (default for moco_v2).",
)
flags.DEFINE_integer("proj_hidden_dim", 0, "Width of the head's hidden layers; 0: the width of h (official SimCLR).")
flags.DEFINE_float(
    "objective_scale", None,
    "Optimised objective = this x the logged loss (the paper's L). Default: the reference code's, 2 for SimCLR "
    "(loss_a + loss_b) and symmetric MoCo (the sum of the two directions), 1 for asymmetric MoCo.",
)
flags.DEFINE_enum("method", "simclr", ["simclr", "moco_v2"], "simclr, or moco_v2 (momentum key encoder and a queue of negatives).")
flags.DEFINE_float("temperature", 0.5, "Contrastive temperature (SimCLR: 0.5 CIFAR, 0.1 ImageNet; MoCo v2: 0.2).")
flags.DEFINE_enum("loss", "nt_xent", ["nt_xent", "hard_negative"], "nt_xent, or hard_negative (HCL; debiased with --hard_negative_beta=0).")
flags.DEFINE_float("hard_negative_beta", 1.0, "HCL concentration beta on hard negatives (--loss=hard_negative).")
flags.DEFINE_float("debias_tau_plus", 0.1, "Debiasing class prior tau_plus in [0, 1) (--loss=hard_negative).")
flags.DEFINE_float("moco_momentum", 0.99, "MoCo key encoder momentum (0.99 CIFAR-scale, 0.999 ImageNet).")
flags.DEFINE_integer("moco_queue_size", 4096, "MoCo queue of negatives (4096 CIFAR, 65536 ImageNet).")
flags.DEFINE_bool("moco_symmetric", True, "MoCo symmetric loss: both views are queries and keys.")
flags.DEFINE_integer("moco_bn_splits", 8, "MoCo: BatchNorm groups of each view's batch, query and (shuffled) key encoder alike (emulates per-device BN).")
# The spelling of earlier versions (then for the key encoder only), so that their flags.txt still parses.
flags.DEFINE_alias("moco_key_bn_splits", "moco_bn_splits")
flags.DEFINE_bool("freeze_encoder", False, "Train only the online probe on a frozen, randomly initialised encoder (baseline).")
# Augmentation
flags.DEFINE_float("color_jitter_strength", 0.5, "Colour distortion strength s (0.5 for CIFAR, 1.0 for ImageNet).")
flags.DEFINE_enum(
    "crop_sampler", "tensorflow", ["tensorflow", "torchvision"],
    "Random crops: 'tensorflow' (tf.image.sample_distorted_bounding_box, the official code's) or 'torchvision' "
    "(RandomResizedCrop: area uniform, log-uniform aspect ratio, as lightly and solo-learn).",
)  # fmt: skip
flags.DEFINE_bool("use_blur", False, "Gaussian blur (on for ImageNet and STL-10, off for CIFAR).")
# Optimisation
flags.DEFINE_integer("batch_size", 512, "Global batch size N (2N views per step).")
flags.DEFINE_integer(
    "micro_batch_size",
    None,
    "SimCLR: encode M images (2M views) at a time, twice, for one exact step over the whole batch (gradient "
    "caching: large batches in little memory, ~1.3x the step time, BENCHMARKS.md); must divide the per-replica batch. Unset: one pass.",
)
flags.DEFINE_integer("train_epochs", 100, "Pretraining epochs.")
flags.DEFINE_integer("train_steps", 0, "Pretraining steps; overrides train_epochs when > 0.")
flags.DEFINE_enum("optimizer", "lars", ["lars", "sgd", "adam", "adamw"], "Optimizer (adam: coupled L2 weight decay, as torch.optim.Adam).")
flags.DEFINE_float("learning_rate", 1.0, "Base learning rate, scaled by lr_scaling.")
flags.DEFINE_enum("lr_scaling", "linear", ["linear", "sqrt"], "linear: lr*B/256; sqrt: lr*sqrt(B).")
flags.DEFINE_float("warmup_epochs", 10, "Linear warm-up length in epochs, then the --lr_schedule.")
flags.DEFINE_enum("lr_schedule", "cosine", ["cosine", "constant"], "After the warm-up: cosine decay to 0 (SimCLR), or constant.")
flags.DEFINE_float("weight_decay", 1e-4, "Weight decay (BatchNorm and bias variables excluded).")
flags.DEFINE_float("momentum", 0.9, "Momentum of LARS and SGD.")
flags.DEFINE_enum(
    "precision",
    "float32",
    ["auto", "float32", "mixed_bfloat16", "mixed_float16"],
    "Keras dtype policy; auto: mixed_bfloat16 on TPU and bfloat16 CPUs, mixed_float16 on GPU, else float32.",
)
# Distribution
flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker", "tpu"], "tf.distribute strategy; multi_worker reads TF_CONFIG.")
flags.DEFINE_string("tpu", None, "TPU address for --strategy=tpu (empty: the local TPU VM).")
flags.DEFINE_integer("cpu_replicas", 0, "Split the host CPU into N logical devices (N >= 2) for mirrored/multi_worker on CPU.")
flags.DEFINE_bool("global_bn", None, "Synchronized BatchNorm across replicas; default: on when there is more than one replica.")
# Outputs
flags.DEFINE_string("model_dir", None, "Directory for checkpoints and logs; an existing run there is resumed.")
flags.DEFINE_integer("checkpoint_every_n_steps", 500, "Checkpoint interval in steps (a checkpoint is also written at the end).")
flags.DEFINE_integer("eval_batch_size", 500, "Batch size of the probe evaluation.")
flags.DEFINE_list(
    "profile_steps", [], "FIRST,LAST: record a TensorFlow profile of these global steps into MODEL_DIR/tensorboard."
)
flags.DEFINE_string("export_dir", None, "If set, export the encoder for TF Serving to EXPORT_DIR/<next version> after training.")
flags.DEFINE_integer(
    "knn_every_n_epochs", 0, "Online kNN monitor: kNN top-1 of --knn_subset eval-split images every N epochs, logged; 0: off."
)
flags.DEFINE_integer("knn_subset", 1000, "Online kNN monitor: images of the eval split classified, against as many training images.")

flags.mark_flag_as_required("model_dir")


def _write_flags(path):
    module_flags = FLAGS.get_key_flags_for_module(sys.modules[__name__])
    with open(path, "w", encoding="utf-8") as file:
        file.write("\n".join(flag.serialize() for flag in module_flags if flag.value is not None) + "\n")


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


def _knn_monitor(num_classes, steps_per_epoch):
    """[KnnMonitor] with --knn_every_n_epochs, else []: kNN of --knn_subset eval-split images against
    as many labelled `train` images."""
    if not FLAGS.knn_every_n_epochs:
        return []
    from simclr_keras import knn_monitor

    if not num_classes:
        fail(f"--knn_every_n_epochs={FLAGS.knn_every_n_epochs} needs labelled images; --dataset={FLAGS.dataset} has none.")
    try:
        memory, memory_labels, queries, query_labels, classes = knn_monitor.load_subsets(
            FLAGS.dataset, "train", FLAGS.eval_split, FLAGS.image_size, FLAGS.data_dir, FLAGS.knn_subset, FLAGS.strict_data
        )
    except ValueError as error:  # DatasetNotFoundError included
        fail(f"--knn_every_n_epochs: {error}")
    return [
        knn_monitor.KnnMonitor(
            memory, memory_labels, queries, query_labels, steps_per_epoch, FLAGS.knn_every_n_epochs, classes,
            batch_size=FLAGS.eval_batch_size,
        )
    ]  # fmt: skip


def _validate():
    if FLAGS.temperature <= 0:
        fail(f"--temperature must be > 0, got {FLAGS.temperature}.")
    if FLAGS.batch_size < 2:
        fail(f"--batch_size must be >= 2 (NT-Xent needs negatives), got {FLAGS.batch_size}.")
    if FLAGS.image_size < 8:
        fail(
            f"--image_size must be >= 8, got {FLAGS.image_size}: the ResNet downsamples by 8 (CIFAR stem, up to "
            "32 px) or by 32 (ImageNet stem, above 32 px), and a smaller image leaves its last block under one pixel."
        )
    if not FLAGS.learning_rate > 0:
        fail(f"--learning_rate must be > 0, got {FLAGS.learning_rate}.")
    for name in ("warmup_epochs", "weight_decay", "color_jitter_strength", "max_train_examples", "checkpoint_every_n_steps"):
        if getattr(FLAGS, name) < 0:
            fail(f"--{name} must be >= 0, got {getattr(FLAGS, name)}.")
    if not 0 <= FLAGS.momentum < 1:
        fail(f"--momentum must be in [0, 1), got {FLAGS.momentum}.")
    if FLAGS.eval_batch_size < 1:
        fail(f"--eval_batch_size must be >= 1, got {FLAGS.eval_batch_size}.")
    if FLAGS.width_multiplier <= 0:
        fail(f"--width_multiplier must be > 0, got {FLAGS.width_multiplier}.")
    if FLAGS.proj_layers < 1 or FLAGS.proj_dim < 1:
        fail(f"--proj_layers and --proj_dim must be >= 1, got {FLAGS.proj_layers} and {FLAGS.proj_dim}.")
    if FLAGS.train_steps <= 0 and FLAGS.train_epochs <= 0:
        fail("set --train_epochs or --train_steps to a positive number.")
    if not 0 <= FLAGS.moco_momentum < 1:
        fail(f"--moco_momentum must be in [0, 1), got {FLAGS.moco_momentum}.")
    if FLAGS.moco_queue_size < 1 or FLAGS.moco_bn_splits < 1:
        fail(f"--moco_queue_size and --moco_bn_splits must be >= 1, got {FLAGS.moco_queue_size} and {FLAGS.moco_bn_splits}.")
    if FLAGS.objective_scale is not None and not FLAGS.objective_scale > 0:
        fail(f"--objective_scale must be > 0, got {FLAGS.objective_scale}.")
    if FLAGS.proj_hidden_dim < 0:
        fail(f"--proj_hidden_dim must be >= 0 (0: the width of h), got {FLAGS.proj_hidden_dim}.")
    if FLAGS.method == "moco_v2" and FLAGS.loss != "nt_xent":
        fail(f"--loss={FLAGS.loss} applies to --method=simclr; MoCo v2 uses its InfoNCE loss with a queue.")
    if FLAGS.method == "moco_v2" and FLAGS.micro_batch_size is not None:
        fail(
            f"--micro_batch_size={FLAGS.micro_batch_size} applies to --method=simclr; MoCo v2 takes its negatives "
            "from a queue, not a large batch: leave it unset."
        )
    if FLAGS.hard_negative_beta < 0:
        fail(f"--hard_negative_beta must be >= 0, got {FLAGS.hard_negative_beta}.")
    if not 0 <= FLAGS.debias_tau_plus < 1:
        fail(f"--debias_tau_plus must be in [0, 1), got {FLAGS.debias_tau_plus}.")
    if FLAGS.cpu_replicas < 0 or FLAGS.cpu_replicas == 1:
        fail(f"--cpu_replicas must be 0 (off) or >= 2, got {FLAGS.cpu_replicas}.")
    if FLAGS.cpu_replicas and FLAGS.strategy not in ("mirrored", "multi_worker"):
        fail(f"--cpu_replicas={FLAGS.cpu_replicas} needs --strategy=mirrored or multi_worker, got --strategy={FLAGS.strategy}.")
    if FLAGS.profile_steps and not (
        len(FLAGS.profile_steps) == 2
        and all(step.isdigit() for step in FLAGS.profile_steps)
        and 1 <= int(FLAGS.profile_steps[0]) <= int(FLAGS.profile_steps[1])
    ):
        given = ",".join(FLAGS.profile_steps)
        fail(f"--profile_steps takes FIRST,LAST global steps with 1 <= FIRST <= LAST, e.g. 5,8; got {given!r}.")
    if FLAGS.knn_every_n_epochs < 0 or FLAGS.knn_subset < 1:
        fail(f"--knn_every_n_epochs must be >= 0 and --knn_subset >= 1, got {FLAGS.knn_every_n_epochs} and {FLAGS.knn_subset}.")
    if FLAGS.knn_every_n_epochs and not FLAGS.eval_split:
        fail(f"--knn_every_n_epochs={FLAGS.knn_every_n_epochs} classifies images of --eval_split, which is empty; pass one.")
    if FLAGS.strategy == "multi_worker" and "TF_CONFIG" not in os.environ:
        fail("--strategy=multi_worker needs the TF_CONFIG environment variable (see README, Scaling out).")


def _lock_run_directory(model_dir):
    """Takes the run directory's lock (simclr_keras.run_lock) or ends the command naming its holder.

    Held until this process ends (the kernel drops it even on kill -9), before anything in the
    directory is read or written: one training process per run.
    """
    try:
        os.makedirs(model_dir, exist_ok=True)
        return RunLock(model_dir).acquire()
    except RunLockedError as error:
        fail(
            f"--model_dir={FLAGS.model_dir} {error.description}; wait for it to end (or stop it), "
            "or pass another --model_dir."
        )
    except OSError as error:
        fail(f"--model_dir={FLAGS.model_dir} cannot be created or written ({error.strerror}); pass a writable directory.")


def run_training():
    # Before the heavy imports, so that a second process on the same run exits at once. Multi-worker
    # runs lock on the chief only, once the strategy has said which process that is.
    run_lock = None if FLAGS.strategy == "multi_worker" else _lock_run_directory(FLAGS.model_dir)
    # Heavy imports after flag parsing, so that --help and flag errors are instant.
    import keras
    import numpy as np
    import tensorflow as tf

    from simclr_keras import callbacks, data, distribute, export, optimizers, runs
    from simclr_keras.models import gradient_cache
    from simclr_keras.models.moco import build_moco
    from simclr_keras.models.simclr import build_simclr

    # First: splitting the CPU into logical devices must happen before TensorFlow uses a device.
    try:
        strategy = distribute.make_strategy(FLAGS.strategy, FLAGS.tpu, FLAGS.cpu_replicas)
    except ValueError as error:
        fail(str(error))
    replicas = strategy.num_replicas_in_sync
    if FLAGS.batch_size % replicas:
        fail(f"--batch_size={FLAGS.batch_size} is not divisible by the {replicas} replicas.")
    try:
        gradient_cache.check_micro_batch_size(FLAGS.micro_batch_size, FLAGS.batch_size // replicas)
    except ValueError as error:
        fail(f"--{error} (--batch_size={FLAGS.batch_size} over {replicas} replica(s))")
    global_bn = replicas > 1 if FLAGS.global_bn is None else FLAGS.global_bn
    chief = distribute.is_chief(strategy)
    # Other multi-worker workers run the same steps but write their outputs to a scratch directory.
    output_dir = FLAGS.model_dir if chief else tempfile.mkdtemp(prefix="simclr_worker_")

    keras.utils.set_random_seed(FLAGS.seed)
    precision = distribute.resolve_precision(FLAGS.precision, strategy)
    keras.mixed_precision.set_dtype_policy(precision)
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):  # creatable is not writable (a read-only mount)
            pass
    except OSError as error:
        fail(f"--model_dir={FLAGS.model_dir} cannot be created or written ({error.strerror}); pass a writable directory.")
    if run_lock is None and chief:  # multi-worker: the chief, now that the strategy has named it
        run_lock = _lock_run_directory(output_dir)
    # Checked now rather than after a long training run.
    if FLAGS.export_dir and chief:
        try:
            os.makedirs(FLAGS.export_dir, exist_ok=True)
        except OSError as error:
            fail(f"--export_dir={FLAGS.export_dir} cannot be created ({error.strerror}); pass a writable directory.")

    train_split = FLAGS.train_split or data.default_pretraining_split(FLAGS.dataset)
    try:
        train_images, train_info = data.load_images(
            FLAGS.dataset, train_split, FLAGS.image_size, FLAGS.data_dir, FLAGS.max_train_examples, FLAGS.strict_data
        )
        warn_about_data(FLAGS.dataset, train_split, train_info)
        eval_images = eval_info = None
        if FLAGS.eval_split and train_info.num_classes:
            eval_images, eval_info = data.load_images(
                FLAGS.dataset, FLAGS.eval_split, FLAGS.image_size, FLAGS.data_dir, strict=FLAGS.strict_data
            )
            warn_about_data(FLAGS.dataset, FLAGS.eval_split, eval_info)
    except data.DatasetNotFoundError as error:  # InvalidImageError (--strict_data) included
        fail(str(error))

    steps_per_epoch = train_info.num_examples // FLAGS.batch_size
    if steps_per_epoch < 1:
        fail(f"--batch_size={FLAGS.batch_size} exceeds the {train_info.num_examples} training images.")
    total_steps = FLAGS.train_steps if FLAGS.train_steps > 0 else FLAGS.train_epochs * steps_per_epoch
    # Scaling uses the global batch: all replicas together take one step on it.
    learning_rate = optimizers.scale_learning_rate(FLAGS.learning_rate, FLAGS.batch_size, FLAGS.lr_scaling)
    # A run shorter than its warm-up (a smoke test, --train_steps=3) warms up over the whole run.
    warmup_steps = min(int(round(FLAGS.warmup_epochs * steps_per_epoch)), total_steps)
    schedule = optimizers.build_schedule(FLAGS.lr_schedule, learning_rate, total_steps, warmup_steps)

    if FLAGS.method == "moco_v2":
        keys_per_replica = FLAGS.batch_size // replicas * (2 if FLAGS.moco_symmetric else 1)
        if (FLAGS.batch_size // replicas) % FLAGS.moco_bn_splits:
            fail(
                f"--moco_bn_splits={FLAGS.moco_bn_splits} must divide the {FLAGS.batch_size // replicas} images of "
                "each view that each replica encodes per step (--batch_size / replicas)."
            )
        if FLAGS.moco_queue_size < keys_per_replica * replicas:
            fail(f"--moco_queue_size={FLAGS.moco_queue_size} is smaller than the {keys_per_replica * replicas} keys of one step.")

    shared_settings = dict(
        image_size=FLAGS.image_size,
        backbone=FLAGS.backbone,
        width_multiplier=FLAGS.width_multiplier,
        proj_layers=FLAGS.proj_layers,
        proj_dim=FLAGS.proj_dim,
        temperature=FLAGS.temperature,
        color_jitter_strength=FLAGS.color_jitter_strength,
        use_blur=FLAGS.use_blur,
        num_classes=train_info.num_classes or None,
        freeze_encoder=FLAGS.freeze_encoder,
        synchronized_batch_norm=global_bn,
        seed=FLAGS.seed,
        zero_init_residual=FLAGS.zero_init_residual,
        crop_sampler=FLAGS.crop_sampler,
        proj_batch_norm=FLAGS.proj_batch_norm or ("none" if FLAGS.method == "moco_v2" else "all"),
        proj_hidden_dim=FLAGS.proj_hidden_dim or None,
        objective_scale=FLAGS.objective_scale,
    )
    with strategy.scope():
        if FLAGS.method == "moco_v2":
            model = build_moco(
                momentum=FLAGS.moco_momentum,
                queue_size=FLAGS.moco_queue_size,
                symmetric=FLAGS.moco_symmetric,
                batch_norm_splits=FLAGS.moco_bn_splits,
                **shared_settings,
            )
        else:
            model = build_simclr(
                loss=FLAGS.loss,
                hard_negative_beta=FLAGS.hard_negative_beta,
                debias_tau_plus=FLAGS.debias_tau_plus,
                micro_batch_size=FLAGS.micro_batch_size,
                **shared_settings,
            )
        model.compile(
            optimizer=optimizers.build_optimizer(
                FLAGS.optimizer,
                schedule,
                FLAGS.weight_decay,
                FLAGS.momentum,
                # As the official code treats its supervised head: the probe is plain momentum SGD.
                exclude_layers=["linear_probe"],
            )
        )
        try:
            manager, start_step = runs.make_checkpoint_manager(
                model, FLAGS.model_dir, save_dir=None if chief else os.path.join(output_dir, runs.CHECKPOINTS)
            )
        except ValueError as error:
            fail(
                f"--model_dir={FLAGS.model_dir} cannot be resumed with these flags: {error}. Pass the flags of that "
                "run (--flagfile=MODEL_DIR/flags.txt) or a new --model_dir."
            )
    if chief:
        with reporting_write_failure("the run's settings (model_config.json, classes.json, flags.txt)", output_dir):
            runs.save_model_config(model, output_dir)
            runs.save_class_names(train_info.class_names, output_dir, FLAGS.dataset)
            _write_flags(os.path.join(output_dir, "flags.txt"))
        print(
            f"{train_info.num_examples} training images ({FLAGS.dataset}:{train_split}), {steps_per_epoch} steps "
            f"per epoch, {total_steps} steps, learning rate {learning_rate:g}, {replicas} replica(s), {precision}"
            + (", global BatchNorm" if global_bn else "")
            + (f", resuming at step {start_step}" if start_step else "")
        )
        print(
            f"logged loss: the paper's (mean over the anchors); optimised objective: {model.objective_scale:g} x it "
            "(the reference code's)"
        )

    # Outside fit: SIGINT/SIGTERM end the run at once (nothing is lost before the first step).
    non_finite = callbacks.StopOnNonFinite()
    stop_on_signal = callbacks.StopOnSignal()
    if start_step < total_steps:
        batches = data.training_batches(
            train_images, train_info, FLAGS.batch_size, FLAGS.image_size, seed=FLAGS.seed, start_step=start_step
        )
        model.fit(
            batches,
            epochs=math.ceil(total_steps / steps_per_epoch),
            initial_epoch=start_step // steps_per_epoch,
            steps_per_epoch=steps_per_epoch,
            # The kNN monitor first: it adds its value to the logs that StepLogger writes.
            callbacks=_knn_monitor(train_info.num_classes, steps_per_epoch)
            + [
                callbacks.StepLogger(
                    os.path.join(output_dir, "train_log.jsonl"), os.path.join(output_dir, "tensorboard"), start_step
                ),
                # Before the checkpoint callback, so that a non-finite step is never saved.
                non_finite,
                stop_on_signal,
                callbacks.CheckpointEveryNSteps(manager, FLAGS.checkpoint_every_n_steps, non_finite),
                callbacks.StopAtStep(total_steps),
            ]
            + (
                [callbacks.ProfileSteps(os.path.join(output_dir, "tensorboard"), *map(int, FLAGS.profile_steps))]
                if FLAGS.profile_steps
                else []
            ),
            shuffle=False,  # the stream is already shuffled; Keras would only warn
            verbose="auto" if chief else 0,
        )
    if non_finite.step is not None:
        latest = tf.train.latest_checkpoint(os.path.join(FLAGS.model_dir, runs.CHECKPOINTS))
        kept = f"the last checkpoint (step {latest.rsplit('-', 1)[-1]}) is kept" if latest else "no checkpoint was written"
        fail(
            f"non-finite {non_finite.reason} at step {non_finite.step}; {kept}. Lower --learning_rate "
            "(or use --precision=float32) and rerun to resume from it."
        )
    if stop_on_signal.received is not None:
        print(
            f"stopped by {stop_on_signal.signal_name} at step {stop_on_signal.step}; the checkpoint of that step is "
            f"in {os.path.join(FLAGS.model_dir, runs.CHECKPOINTS)}. Rerun the same command to resume.",
            file=sys.stderr,
        )
        sys.exit(128 + stop_on_signal.received)  # the shell's convention for a signal's exit status

    if eval_images is not None:
        results = model.evaluate(
            data.evaluation_batches(eval_images, eval_info, FLAGS.eval_batch_size, FLAGS.image_size),
            return_dict=True,
            verbose=0,
        )
        results = {
            "split": FLAGS.eval_split,
            "num_examples": eval_info.num_examples,
            "step": int(model.optimizer.iterations.numpy()),
            **{name: float(np.mean(value)) for name, value in results.items()},
        }
        with reporting_write_failure("the evaluation results", os.path.join(output_dir, runs.EVAL_RESULTS)):
            runs.save_eval_results(results, output_dir)
        if chief:
            print(
                f"online linear probe on {FLAGS.dataset}:{FLAGS.eval_split} ({eval_info.num_examples} images): "
                f"top-1 accuracy {results['probe_accuracy']:.4f}"
            )
    if FLAGS.export_dir:
        # Every worker saves (saving may need collective ops); the others into their scratch space.
        with reporting_write_failure("the export", FLAGS.export_dir):
            version_dir = export.export_encoder(model, FLAGS.export_dir if chief else os.path.join(output_dir, "export"))
        if chief:
            print(f"exported the encoder to {version_dir}")
    if chief:
        _write_plots(model, train_images, train_info.class_names, output_dir, FLAGS.seed)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        # Synchronous training keeps every worker's weights identical; this line lets anyone check.
        fingerprint = sum(float(np.sum(np.square(w))) for w in model.get_weights())
        print(f"worker {strategy.cluster_resolver.task_id}: sum of squared weights {fingerprint:.10e}")
    if not chief:
        shutil.rmtree(output_dir, ignore_errors=True)
    if run_lock is not None:
        run_lock.release()


def main(argv):
    logging.set_verbosity(logging.WARNING)  # TensorFlow's INFO lines would bury the progress bar
    reject_positional_arguments(argv)
    _validate()
    try:
        run_training()
    except WriteFailure as failure:  # a full disk or no permission, anywhere in the run
        fail(stop_message(failure, os.path.join(FLAGS.model_dir, "checkpoints")))


if __name__ == "__main__":
    app.run(main)
