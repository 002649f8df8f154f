"""What the command-line modules (train, evaluate, export) share: how they end on a user error."""

import sys


def fail(message):
    """Ends the command with a one-line `error: ...` on stderr, exit status 1, and no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def reject_positional_arguments(argv):
    """absl passes unparsed words through; every input here is a --flag."""
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; flags are written --name=value.")
