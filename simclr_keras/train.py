"""Pretrain a SimCLR encoder from the command line.

    python -m simclr_keras.train --flagfile=configs/cifar10.flags --model_dir=runs/cifar10
    python -m simclr_keras.train --flagfile=configs/quickstart.flags \
        --dataset=folder:../shared/datasets/cifar10 --model_dir=runs/quickstart

Writes to --model_dir: checkpoints (re-running with the same model_dir resumes), flags.txt (the flags
used, re-usable as a --flagfile), train_log.jsonl (one JSON object per step), TensorBoard logs in
tensorboard/, and eval_results.json (the online linear probe on the evaluation split).
"""

import json
import math
import os
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS

# Data
flags.DEFINE_string("dataset", "cifar10", "cifar10, cifar100, stl10, imagenet2012 (TFDS) or folder:DIR.")
flags.DEFINE_string("data_dir", None, "TFDS data directory holding prepared datasets.")
flags.DEFINE_string("train_split", "", "Pretraining split; empty: train (+unlabelled where the dataset has it).")
flags.DEFINE_string("eval_split", "test", "Split the online probe is evaluated on after training; empty: none.")
flags.DEFINE_integer("max_train_examples", 0, "Use only the first N training images (class-balanced for folders); 0: all.")
flags.DEFINE_integer("image_size", 32, "Side of the square views fed to the encoder, in pixels.")
flags.DEFINE_integer("seed", 0, "Seed of data order, augmentation and initialisation.")
# Model
flags.DEFINE_enum("backbone", "resnet18", ["resnet18", "resnet34", "resnet50"], "Encoder f.")
flags.DEFINE_float("width_multiplier", 1.0, "Channel width multiplier of the ResNet.")
flags.DEFINE_integer("proj_layers", 2, "Projection head depth: 2 = SimCLR v1, 3 = SimCLR v2.")
flags.DEFINE_integer("proj_dim", 128, "Output dimension of the projection head.")
flags.DEFINE_float("temperature", 0.5, "NT-Xent temperature.")
flags.DEFINE_bool("freeze_encoder", False, "Train only the online probe on a frozen, randomly initialised encoder (baseline).")
# Augmentation
flags.DEFINE_float("color_jitter_strength", 0.5, "Colour distortion strength s (0.5 for CIFAR, 1.0 for ImageNet).")
flags.DEFINE_bool("use_blur", False, "Gaussian blur (on for ImageNet and STL-10, off for CIFAR).")
# Optimisation
flags.DEFINE_integer("batch_size", 512, "Global batch size N (2N views per step).")
flags.DEFINE_integer("train_epochs", 100, "Pretraining epochs.")
flags.DEFINE_integer("train_steps", 0, "Pretraining steps; overrides train_epochs when > 0.")
flags.DEFINE_enum("optimizer", "lars", ["lars", "sgd", "adamw"], "Optimizer.")
flags.DEFINE_float("learning_rate", 1.0, "Base learning rate, scaled by lr_scaling.")
flags.DEFINE_enum("lr_scaling", "linear", ["linear", "sqrt"], "linear: lr*B/256; sqrt: lr*sqrt(B).")
flags.DEFINE_float("warmup_epochs", 10, "Linear warm-up length in epochs, then cosine decay.")
flags.DEFINE_float("weight_decay", 1e-4, "Weight decay (BatchNorm and bias variables excluded).")
flags.DEFINE_float("momentum", 0.9, "Momentum of LARS and SGD.")
flags.DEFINE_enum("precision", "float32", ["float32", "mixed_bfloat16", "mixed_float16"], "Keras dtype policy.")
# Outputs
flags.DEFINE_string("model_dir", None, "Directory for checkpoints and logs; an existing run there is resumed.")
flags.DEFINE_integer("checkpoint_every_n_steps", 500, "Checkpoint interval in steps (a checkpoint is also written at the end).")
flags.DEFINE_integer("eval_batch_size", 500, "Batch size of the probe evaluation.")

flags.mark_flag_as_required("model_dir")


def _fail(message):
    """Ends the command with a one-line message and no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def _write_flags(path):
    module_flags = FLAGS.get_key_flags_for_module(sys.modules[__name__])
    with open(path, "w", encoding="utf-8") as file:
        file.write("\n".join(flag.serialize() for flag in module_flags if flag.value is not None) + "\n")


def _validate():
    if FLAGS.temperature <= 0:
        _fail(f"--temperature must be > 0, got {FLAGS.temperature}.")
    if FLAGS.batch_size < 2:
        _fail(f"--batch_size must be >= 2 (NT-Xent needs negatives), got {FLAGS.batch_size}.")
    if FLAGS.image_size < 8:
        _fail(f"--image_size must be >= 8, got {FLAGS.image_size}.")
    if FLAGS.width_multiplier <= 0:
        _fail(f"--width_multiplier must be > 0, got {FLAGS.width_multiplier}.")
    if FLAGS.proj_layers < 1 or FLAGS.proj_dim < 1:
        _fail(f"--proj_layers and --proj_dim must be >= 1, got {FLAGS.proj_layers} and {FLAGS.proj_dim}.")
    if FLAGS.train_steps <= 0 and FLAGS.train_epochs <= 0:
        _fail("set --train_epochs or --train_steps to a positive number.")


def run_training():
    # Heavy imports after flag parsing, so that --help and flag errors are instant.
    import keras

    from simclr_keras import callbacks, data, optimizers, runs
    from simclr_keras.models.simclr import build_simclr

    keras.utils.set_random_seed(FLAGS.seed)
    keras.mixed_precision.set_dtype_policy(FLAGS.precision)
    try:
        os.makedirs(FLAGS.model_dir, exist_ok=True)
    except OSError as error:
        _fail(f"--model_dir={FLAGS.model_dir} cannot be created ({error.strerror}); pass a writable directory.")

    train_split = FLAGS.train_split or data.default_pretraining_split(FLAGS.dataset)
    try:
        train_images, train_info = data.load_images(
            FLAGS.dataset, train_split, FLAGS.image_size, FLAGS.data_dir, FLAGS.max_train_examples
        )
        eval_images = eval_info = None
        if FLAGS.eval_split and train_info.num_classes:
            eval_images, eval_info = data.load_images(
                FLAGS.dataset, FLAGS.eval_split, FLAGS.image_size, FLAGS.data_dir
            )
    except data.DatasetNotFoundError as error:
        _fail(str(error))

    steps_per_epoch = train_info.num_examples // FLAGS.batch_size
    if steps_per_epoch < 1:
        _fail(f"--batch_size={FLAGS.batch_size} exceeds the {train_info.num_examples} training images.")
    total_steps = FLAGS.train_steps if FLAGS.train_steps > 0 else FLAGS.train_epochs * steps_per_epoch
    learning_rate = optimizers.scale_learning_rate(FLAGS.learning_rate, FLAGS.batch_size, FLAGS.lr_scaling)
    # A run shorter than its warm-up (a smoke test, --train_steps=3) warms up over the whole run.
    warmup_steps = min(int(round(FLAGS.warmup_epochs * steps_per_epoch)), total_steps)
    schedule = optimizers.WarmupCosineDecay(learning_rate, total_steps, warmup_steps)

    model = build_simclr(
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
        seed=FLAGS.seed,
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
    manager, start_step = runs.make_checkpoint_manager(model, FLAGS.model_dir)
    runs.save_model_config(model, FLAGS.model_dir)
    _write_flags(os.path.join(FLAGS.model_dir, "flags.txt"))
    print(
        f"{train_info.num_examples} training images ({FLAGS.dataset}:{train_split}), {steps_per_epoch} steps per "
        f"epoch, {total_steps} steps, learning rate {learning_rate:g}"
        + (f", resuming at step {start_step}" if start_step else "")
    )

    if start_step < total_steps:
        batches = data.training_batches(
            train_images, train_info, FLAGS.batch_size, FLAGS.image_size, seed=FLAGS.seed, start_step=start_step
        )
        model.fit(
            batches,
            epochs=math.ceil(total_steps / steps_per_epoch),
            initial_epoch=start_step // steps_per_epoch,
            steps_per_epoch=steps_per_epoch,
            callbacks=[
                callbacks.StepLogger(
                    os.path.join(FLAGS.model_dir, "train_log.jsonl"), os.path.join(FLAGS.model_dir, "tensorboard")
                ),
                callbacks.CheckpointEveryNSteps(manager, FLAGS.checkpoint_every_n_steps),
                callbacks.StopAtStep(total_steps),
            ],
            shuffle=False,  # the stream is already shuffled; Keras would only warn
            verbose="auto",
        )

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
            **{name: float(value) for name, value in results.items()},
        }
        with open(os.path.join(FLAGS.model_dir, "eval_results.json"), "w", encoding="utf-8") as file:
            json.dump(results, file, indent=2)
        print(
            f"online linear probe on {FLAGS.dataset}:{FLAGS.eval_split} ({eval_info.num_examples} images): "
            f"top-1 accuracy {results['probe_accuracy']:.4f}"
        )


def main(argv):
    logging.set_verbosity(logging.WARNING)  # TensorFlow's INFO lines would bury the progress bar
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; flags are written --name=value.")
    _validate()
    run_training()


if __name__ == "__main__":
    app.run(main)
