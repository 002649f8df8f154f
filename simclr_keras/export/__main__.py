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


def define_flags(flag_values=FLAGS):
    """The flags, defined when the module runs (not on import): simclr_keras.train defines a
    --model_dir and a --head_layer too, and both modules import into one process (the tests)."""
    flags.DEFINE_string(
        "model_dir", None, "Training run (the --model_dir of simclr_keras.train) whose latest checkpoint is exported.",
        flag_values=flag_values,
    )  # fmt: skip
    flags.DEFINE_string(
        "export_dir", None, "TF Serving model base path; the encoder is written to EXPORT_DIR/<next version>.",
        flag_values=flag_values,
    )  # fmt: skip
    flags.DEFINE_integer(
        "head_layer", 0, "Also return `head_layer_K`, the projection head's K-th layer (SimCLR v2); 0: no extra output.",
        flag_values=flag_values,
    )  # fmt: skip
    flags.DEFINE_integer(
        "max_image_side", 4096, "Longest image side, in pixels, that the served signatures accept; larger is refused.",
        flag_values=flag_values,
    )  # fmt: skip
    flags.DEFINE_integer(
        "max_batch_size", 1024, "Most images one request may hold; larger requests are refused.",
        flag_values=flag_values,
    )  # fmt: skip
    flags.mark_flags_as_required(["model_dir", "export_dir"], flag_values=flag_values)


def main(argv, flag_values=FLAGS):
    logging.set_verbosity(logging.WARNING)
    reject_positional_arguments(argv)
    model_dir, export_dir, head_layer = flag_values.model_dir, flag_values.export_dir, flag_values.head_layer
    bounds = {"max_image_side": flag_values.max_image_side, "max_batch_size": flag_values.max_batch_size}
    # Checked before TensorFlow loads and the model is rebuilt.
    if os.path.exists(export_dir) and not os.path.isdir(export_dir):
        fail(f"--export_dir={export_dir} is a file; pass a directory (versions are written into it).")
    for name, value in bounds.items():
        if value < 1:
            fail(f"--{name}={value}: pass a positive number of {'pixels' if name == 'max_image_side' else 'images'}.")
    from simclr_keras import export, runs

    try:
        model = runs.load_model(model_dir)
    except FileNotFoundError as error:
        fail(f"--model_dir={model_dir} cannot be exported: {error}")
    try:
        version_dir = export.export_encoder(model, export_dir, head_layer or None, **bounds)
    except ValueError as error:
        fail(f"--head_layer={head_layer}: {error}")
    except OSError as error:
        fail(f"--export_dir={export_dir} cannot be written ({error.strerror or error}); pass a writable directory.")
    print(f"exported the encoder of {model_dir} to {version_dir}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
