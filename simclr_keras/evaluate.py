"""Evaluate a pretrained encoder from the command line: kNN, linear evaluation or fine-tuning.

    python -m simclr_keras.evaluate --protocol=knn --model_dir=runs/cifar10 \
        --dataset=cifar10 --output=runs/cifar10/knn.json
    python -m simclr_keras.evaluate --protocol=linear --encoder=exports/cifar10/1 --dataset=cifar10 --data_dir=DIR
    python -m simclr_keras.evaluate --protocol=finetune --label_fraction=0.1 --model_dir=runs/cifar10 ...
    python -m simclr_keras.evaluate --protocol=knn --model_dir=runs/cifar10 --random_init ...  # the baseline

The encoder is a training run's latest checkpoint (--model_dir) or an exported encoder's SavedModel
(--encoder=EXPORT_DIR/<version>, whose serving_default signature gives the features; finetune rebuilds a
trainable encoder from its Keras configs, simclr_keras.export.load_exported_parts). Features are those of
unaugmented images through the encoder in inference mode (--linear_protocol=hcl_dcl trains its classifier
on the encoder in training mode, as the HCL/DCL references do), at the training size or --image_size. Prints one line with top-1 and top-5 test accuracy; --output
also writes them, the example counts and every setting used, as JSON, and the test confusion matrix as
<output stem>_confusion.png (or --confusion_matrix=PATH). simclr_keras.evaluation documents the
protocols. The same from Python: `simclr_keras.evaluate_encoder(simclr_keras.EvalConfig(...))`
(simclr_keras/eval_run.py); the flags are EvalConfig's fields (simclr_keras/eval_config.py).
"""

import sys

from absl import app, flags, logging

from simclr_keras import cli, config_flags
from simclr_keras.eval_config import EvalConfig

FLAGS = flags.FLAGS


def define_flags(flag_values=FLAGS):
    """The flags, one per EvalConfig field. Defined when the module runs (not on import), so that
    this module and simclr_keras.train, whose flags share names, import into one process."""
    config_flags.define_flags(EvalConfig, flag_values)


def main(argv, flag_values=FLAGS):
    """flags -> EvalConfig -> validate -> evaluate_encoder -> exit status.

    Flag problems end in one `error: --flag ...` line each and exit status 2; a problem found while
    evaluating (a missing run, unreadable data) in one such line and exit status 1.
    """
    logging.set_verbosity(logging.WARNING)  # TensorFlow's INFO lines would bury the result
    cli.reject_positional_arguments(argv)
    config = config_flags.config_from_flags(EvalConfig, flag_values)
    cli.exit_if_invalid(config)
    # TensorFlow loads here, after validation: --help and flag errors are instant.
    from simclr_keras import data
    from simclr_keras.eval_run import EvaluationError, evaluate_encoder

    try:
        result = evaluate_encoder(config)
    except (EvaluationError, data.DatasetNotFoundError) as error:  # InvalidImageError (--strict_data) included
        cli.fail(config_flags.as_flag_message(str(error), EvalConfig))
    print(result.summary)


if __name__ == "__main__":
    define_flags()
    app.run(main)
