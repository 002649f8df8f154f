"""The one two-replica MirroredStrategy of the test process, shared by every test module that needs it.

Separate MirroredStrategy objects in one process reuse collective instance keys, and their
all-gathers and all-reduces then collide ("Shape mismatch in the collective instance"), so all
tests take this one. tests/conftest.py splits the CPU into the 2 logical devices it runs on.
"""

import functools

import tensorflow as tf


@functools.lru_cache(maxsize=None)
def mirrored():
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    assert len(devices) == 2, "tests/conftest.py splits the CPU into 2 logical devices"
    return tf.distribute.MirroredStrategy(devices)
