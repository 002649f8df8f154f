"""Export a training run's encoder for TensorFlow Serving.

    python -m simclr_keras.export --model_dir=runs/cifar10 --export_dir=exports/cifar10

Restores the run's latest checkpoint and writes its encoder to the next version folder of
--export_dir (exports/cifar10/1, then 2, ...), the layout `tensorflow/serving` reads. See
`simclr_keras.export` for what the SavedModel holds.
"""

import os

from absl import app, flags, logging

from simclr_keras.cli import fail
from simclr_keras.cli import reject_positional_arguments

FLAGS = flags.FLAGS

flags.DEFINE_string("model_dir", None, "Training run (the --model_dir of simclr_keras.train) whose latest checkpoint is exported.")
flags.DEFINE_string("export_dir", None, "TF Serving model base path; the encoder is written to EXPORT_DIR/<next version>.")
flags.DEFINE_integer("head_layer", 0, "Also return `head_layer_K`, the projection head's K-th layer (SimCLR v2); 0: no extra output.")

flags.mark_flags_as_required(["model_dir", "export_dir"])


def main(argv):
    logging.set_verbosity(logging.WARNING)
    reject_positional_arguments(argv)
    # Checked before TensorFlow loads and the model is rebuilt.
    if os.path.exists(FLAGS.export_dir) and not os.path.isdir(FLAGS.export_dir):
        fail(f"--export_dir={FLAGS.export_dir} is a file; pass a directory (versions are written into it).")
    from simclr_keras import export, runs

    try:
        model = runs.load_model(FLAGS.model_dir)
    except FileNotFoundError as error:
        fail(f"--model_dir={FLAGS.model_dir} cannot be exported: {error}")
    try:
        version_dir = export.export_encoder(model, FLAGS.export_dir, FLAGS.head_layer or None)
    except ValueError as error:
        fail(f"--head_layer={FLAGS.head_layer}: {error}")
    except OSError as error:
        fail(f"--export_dir={FLAGS.export_dir} cannot be written ({error.strerror or error}); pass a writable directory.")
    print(f"exported the encoder of {FLAGS.model_dir} to {version_dir}")


if __name__ == "__main__":
    app.run(main)
