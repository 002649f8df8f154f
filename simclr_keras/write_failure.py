"""A file of a training run that cannot be written (a full disk, no permission) stops the run cleanly.

Writers wrap their writes in `reporting_write_failure(what, path)`, which turns the operating
system's error (OSError) or TensorFlow's (tf.errors.OpError: ResourceExhaustedError for ENOSPC,
PermissionDeniedError for EACCES, ...) into a `WriteFailure`. The training command catches it and
ends with one line: what could not be written, why, and the last complete checkpoint, which a
failed write never replaces (a checkpoint's files are written before its index points at them).
"""

import contextlib
import errno
import re

# The errno values that mean "this location cannot take the write", as opposed to a program error.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG, errno.EIO})


class WriteFailure(Exception):
    """A run's file could not be written.

    Attributes:
      what: str, what was being written, e.g. "the checkpoint of step 12".
      path: str, the file or directory it was written to.
      reason: str, the system's reason, e.g. "No space left on device".
    """

    def __init__(self, what, path, reason):
        self.what, self.path, self.reason = what, path, reason
        super().__init__(f"could not write {what} to {path} ({reason})")


def error_reason(error):
    """The short reason of an OSError or a TensorFlow OpError: "No space left on device", ...

    TensorFlow's message reads "{{function_node ...}} PATH; REASON [Op:SaveV2]".
    """
    if isinstance(error, OSError):
        return error.strerror or str(error)
    message = (getattr(error, "message", None) or str(error)).strip()
    message = message.splitlines()[0] if message else type(error).__name__
    message = re.sub(r"^\{\{[^}]*\}\}\s*", "", message)
    message = re.sub(r"\s*\[Op:[^\]]*\]$", "", message)
    return message.rsplit("; ", 1)[-1] or type(error).__name__


def is_write_error(error):
    """Whether `error` says a file could not be written: any OSError from a write, or a TF OpError."""
    if isinstance(error, OSError):
        return True
    # Checked by module, not by import, so that this module never loads TensorFlow itself.
    return any(cls.__name__ == "OpError" and cls.__module__.startswith("tensorflow") for cls in type(error).__mro__)


@contextlib.contextmanager
def reporting_write_failure(what, path):
    """Turns an OSError or TensorFlow OpError raised inside the block into a WriteFailure(what, path)."""
    try:
        yield
    except WriteFailure:
        raise
    except Exception as error:
        if not is_write_error(error):
            raise
        raise WriteFailure(what, path, error_reason(error)) from error


def stop_message(failure, checkpoint_dir):
    """The one line that ends a run after `failure`, naming the latest complete checkpoint in checkpoint_dir."""
    import tensorflow as tf  # loaded already: only a run that wrote something gets here

    latest = tf.train.latest_checkpoint(checkpoint_dir)
    if latest:
        kept = f"the last complete checkpoint (step {latest.rsplit('-', 1)[-1]}, {latest}) is kept"
        action = "rerun the same command to resume from it"
    else:
        kept, action = "no checkpoint had been written yet", "rerun the same command to start again"
    return f"{failure}; {kept}. Free space (or fix the permissions) and {action}."
