"""Pretrain a SimCLR encoder from the command line.

    python -m simclr_keras.train --flagfile=configs/cifar10.flags --model_dir=runs/cifar10
    python -m simclr_keras.train --flagfile=configs/quickstart.flags --model_dir=runs/quickstart

Writes to --model_dir: checkpoints (re-running with the same model_dir resumes), flags.txt (the flags
used, re-usable as a --flagfile), train_log.jsonl (one JSON object per step), TensorBoard logs in
tensorboard/, and eval_results.json (the online linear probe on the evaluation split). With --export_dir,
the encoder is then exported as a TF Serving SavedModel (see simclr_keras.export). Last come two
pictures (simclr_keras.plots): training_curves.png and augmented_pairs.png.

The flags are the fields of `simclr_keras.TrainConfig` (same names, defaults and help), and the run
is `simclr_keras.pretrain(config)`: this module only turns one into the other. Exit status: 0 done;
2 flags that cannot be valid (checked before TensorFlow loads); 1 settings the data or devices
refuse, a non-finite loss or a file that cannot be written; 128 + N stopped by signal N (resumable).
"""

import os
import sys

from absl import app, flags, logging

from simclr_keras import config_flags
from simclr_keras.cli import exit_if_invalid, reject_positional_arguments
from simclr_keras.train_config import ConfigError, TrainConfig

FLAGS = flags.FLAGS

config_flags.define_flags(TrainConfig, FLAGS)


def _error(message, status):
    """Ends the command with a one-line `error: --flag ...` on stderr and `status`, without traceback."""
    print(f"error: {config_flags.as_flag_message(message, TrainConfig)}", file=sys.stderr)
    sys.exit(status)


def main(argv):
    logging.set_verbosity(logging.WARNING)  # TensorFlow's INFO lines would bury the progress bar
    reject_positional_arguments(argv)
    config = config_flags.config_from_flags(TrainConfig, FLAGS)
    exit_if_invalid(config)
    # Only now TensorFlow loads (inside pretrain, once the run directory is locked).
    from simclr_keras.train_run import NON_FINITE, STOPPED_BY_SIGNAL, pretrain
    from simclr_keras.write_failure import WriteFailure, stop_message

    try:
        result = pretrain(config)
    except ConfigError as error:
        _error(str(error), 1)
    except WriteFailure as failure:  # a full disk or no permission, anywhere in the run
        _error(stop_message(failure, os.path.join(config.model_dir, "checkpoints")), 1)
    if result.stop_reason == NON_FINITE:
        _error(result.message, 1)
    if result.stop_reason == STOPPED_BY_SIGNAL:
        print(f"{result.message} Rerun the same command to resume.", file=sys.stderr)
        sys.exit(128 + result.signal_number)  # the shell's convention for a signal's exit status
    return 0


if __name__ == "__main__":
    app.run(main)
