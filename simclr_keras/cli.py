"""What the command-line modules (train, evaluate, export) share: how they end on a user error."""

import sys

from simclr_keras import config_flags


def exit_if_invalid(config):
    """Prints each of `config.validate()`'s problems as one `error: --flag ...` line; exit status 2 if any."""
    problems = config.validate()
    for problem in problems:
        print(f"error: {config_flags.as_flag_message(problem, type(config))}", file=sys.stderr)
    if problems:
        sys.exit(2)


def fail(message):
    """Ends the command with a one-line `error: ...` on stderr, exit status 1, and no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def warn_about_data(dataset, split, info, limit=20):
    """Prints on stderr the image-folder files that `info` (a data.DatasetInfo) left out, the first
    `limit` by name and then their count, and its other notes; nothing for a clean split."""
    from simclr_keras import data  # here, not at the top: data imports TensorFlow

    report = data.skipped_files_report(info, limit)
    if report:
        # "skipped N file(s) that ...:" -> "warning: DATASET split 'S': skipped N file(s) that ... (...):"
        report[0] = f"warning: {dataset} split '{split}': {report[0].rstrip(':')} (--strict_data makes them an error):"
        print("\n".join(report), file=sys.stderr)
    for note in info.notes:
        print(f"warning: {dataset}: {note}", file=sys.stderr)


def reject_positional_arguments(argv):
    """absl passes unparsed words through; every input here is a --flag."""
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; flags are written --name=value.")
