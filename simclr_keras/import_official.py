"""Import an official SimCLR v1/v2 TF2 SavedModel (google-research/simclr) as our export or run.

    python -m simclr_keras.import_official --saved_model=r50_1x_sk0/saved_model --export_dir=exports/r50_1x_sk0
    python -m simclr_keras.import_official --saved_model=r50_1x_sk0/saved_model --model_dir=runs/r50_1x_sk0

--export_dir writes the encoder as `simclr_keras.export_encoder` does (TF Serving layout; `load_encoder`
reads it back as a trainable model); --model_dir writes a run directory (model_config.json and a
checkpoint) that `simclr_keras.evaluate` and `runs.load_model` accept. Both may be given. See
`simclr_keras.official` for what is checked; nothing is written unless every variable matched and
the imported model reproduced the SavedModel's outputs.
"""

import os

from absl import app, flags, logging

from simclr_keras.cli import fail, reject_positional_arguments

FLAGS = flags.FLAGS

flags.DEFINE_string("saved_model", None, "Folder of an official SimCLR TF2 SavedModel (the one holding saved_model.pb).")
flags.DEFINE_string("export_dir", None, "Write the encoder for TF Serving to EXPORT_DIR/<next version>.")
flags.DEFINE_string("model_dir", None, "Write a run directory (model_config.json, checkpoints/) for evaluation and fine-tuning.")
flags.DEFINE_bool("verify", True, "Check that the imported model reproduces the SavedModel's h, z and logits.")

flags.mark_flag_as_required("saved_model")


def _check_output_flags():
    if not FLAGS.export_dir and not FLAGS.model_dir:
        fail("--export_dir or --model_dir (or both) is needed: say where the imported model goes.")
    for flag in ("export_dir", "model_dir"):
        path = getattr(FLAGS, flag)
        if path and os.path.exists(path) and not os.path.isdir(path):
            fail(f"--{flag}={path} is a file; pass a directory.")
    if FLAGS.model_dir and os.path.isdir(os.path.join(FLAGS.model_dir, "checkpoints")):
        fail(f"--model_dir={FLAGS.model_dir} already holds a run (checkpoints/); pass a new directory.")


def write_run_directory(model, model_dir):
    """MODEL_DIR/model_config.json and a checkpoint of the model, as `runs.load_model` reads them."""
    import tensorflow as tf

    from simclr_keras import runs

    os.makedirs(model_dir, exist_ok=True)
    runs.save_model_config(model, model_dir)
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(model=model), os.path.join(model_dir, runs.CHECKPOINTS), max_to_keep=1
    )
    return manager.save(checkpoint_number=0)


def main(argv):
    logging.set_verbosity(logging.WARNING)
    reject_positional_arguments(argv)
    _check_output_flags()
    from simclr_keras import export, official

    try:
        model, variant, errors = official.import_official_simclr(FLAGS.saved_model, verify_outputs=FLAGS.verify)
    except official.NotOfficialSimCLRError as error:
        fail(f"--saved_model={FLAGS.saved_model}: {error}")
    head = f"{variant.projection_layers}-layer projection head" if variant.projection_layers else "no projection head (a new 2-layer one)"
    classes = f", a {variant.num_classes}-class linear head" if variant.num_classes else ""
    checked = ", ".join(f"{output} {error:.1e}" for output, error in errors.items())
    print(f"imported {variant.name}: ResNet-{variant.depth} {variant.width_multiplier:g}x, {head}{classes}"
          + (f"; largest relative error against the SavedModel: {checked}" if checked else "; not verified"))
    try:
        if FLAGS.export_dir:
            print(f"exported the encoder to {export.export_encoder(model, FLAGS.export_dir)}")
        if FLAGS.model_dir:
            write_run_directory(model, FLAGS.model_dir)
            print(f"wrote the run directory {FLAGS.model_dir}")
    except OSError as error:
        fail(f"cannot write the imported model ({error.strerror or error}); pass writable --export_dir/--model_dir.")


if __name__ == "__main__":
    app.run(main)
