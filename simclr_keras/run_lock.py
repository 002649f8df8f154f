"""One training process per run directory: an exclusive lock on MODEL_DIR/train.lock.

The lock is `fcntl.flock` on an open file, so the kernel drops it when the holding process ends in
any way (exit, crash, `kill -9`): a lock is never left stale, and the file itself is never deleted
(deleting it would let a second process lock a new file of the same name while the first still runs).
While held, the file names its holder: {"pid", "host", "started"}. Evaluation and export never take
the lock; they read only files that training replaces atomically (checkpoints through their index,
model_config.json through a rename).

flock works on local filesystems and, on Linux, on NFS (emulated there with byte-range locks).
Imports no TensorFlow, so that it stays cheap to use from any process.
"""

import fcntl
import json
import os
import socket
import time

LOCK_FILE = "train.lock"


class RunLockedError(RuntimeError):
    """Another process holds the run directory's lock.

    Attributes:
      model_dir: the run directory.
      holder: {"pid", "host", "started"} of the holding process, or {} if it has not written them yet.
      description: the message without the directory: "is already being trained by process ...".
    """

    def __init__(self, model_dir, holder):
        self.model_dir = model_dir
        self.holder = holder
        if "pid" in holder:
            who = f"process {holder['pid']}" + (f" on {holder['host']}" if holder.get("host") else "")
        else:
            who = "another process"
        # Without the directory, for messages that name it their own way (the CLI's --model_dir=...).
        self.description = f"is already being trained by {who} (it holds {os.path.join(model_dir, LOCK_FILE)})"
        super().__init__(f"{model_dir} {self.description}")


class RunLock:
    """An exclusive, non-blocking lock on `model_dir` for the lifetime of one training process.

    Usage: `lock = RunLock(model_dir).acquire()`, then keep `lock` referenced while training; it is
    released by `release()`, by garbage collection of the object, or by the process ending.

    Args:
      model_dir: str, an existing, writable run directory.
    """

    def __init__(self, model_dir):
        self.model_dir = model_dir
        self.path = os.path.join(model_dir, LOCK_FILE)
        self._file = None

    def acquire(self):
        """Takes the lock at once or raises RunLockedError naming the holder; returns self."""
        # "a+": created if missing, never truncated before we hold the lock (the holder's PID is in it).
        lock_file = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            raise RunLockedError(self.model_dir, read_holder(self.path)) from None
        except BaseException:
            lock_file.close()
            raise
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}) + "\n")
        lock_file.flush()
        self._file = lock_file
        return self

    @property
    def held(self):
        return self._file is not None

    def release(self):
        if self._file is not None:
            self._file.close()  # closing the last descriptor of the open file drops the flock
            self._file = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exception):
        self.release()


def read_holder(path, wait_seconds=1.0):
    """The {"pid", "host", "started"} written by the lock's holder; {} if none appears within wait_seconds.

    The holder writes them right after taking the lock, so a process that lost the race by a few
    microseconds may find the file still empty: it looks again for a moment.
    """
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            with open(path, encoding="utf-8") as file:
                holder = json.loads(file.read())
            if isinstance(holder, dict) and "pid" in holder and _may_be_alive(holder):
                return holder
        except (OSError, ValueError):  # missing, empty or being written
            pass
        if time.monotonic() >= deadline:
            return {}
        time.sleep(0.02)


def _may_be_alive(holder):
    """False for a process of this host that has ended: the file then still names a previous holder."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (OSError, ValueError):  # PermissionError: alive, another user's
        pass
    return True
