"""Registers the package's Keras classes as soon as Keras is loaded, without loading it ourselves.

`keras.saving.load_model` finds a custom class only if the module defining it has run its
`@keras.saving.register_keras_serializable` decorator: Keras imports modules by itself only for
`keras*` packages. When `simclr_keras` was imported eagerly, every such module ran at
`import simclr_keras`, at the price of importing TensorFlow. Now `import simclr_keras` imports none of
them; instead:

- if Keras is already loaded, `register_now_or_after_keras` imports them at once;
- otherwise it puts a finder first on `sys.meta_path` that watches the imports of `keras`,
  `tensorflow` and `simclr_keras.*`, and imports them once Keras is loaded and none of those imports is
  still running (so that no module of ours is read half-initialised: `import tensorflow` loads Keras
  from inside itself, and `simclr_keras.augment` loads TensorFlow from inside itself). Then the finder
  removes itself.

So `import simclr_keras; import keras; keras.models.load_model(path)` works in either import order.
This module imports nothing heavy.
"""

import importlib
import sys

# Every module with a @keras.saving.register_keras_serializable class (tests/test_package.py checks
# that this list is complete).
SERIALIZABLE_MODULES = (
    "simclr_keras.augment",
    "simclr_keras.batch_norm",
    "simclr_keras.conv",
    "simclr_keras.selective_kernel",
    "simclr_keras.heads",
    "simclr_keras.optimizers",
    "simclr_keras.models.simclr",
    "simclr_keras.models.moco",
    "simclr_keras.export",
)

# Imports whose end may be the moment Keras has become usable.
_WATCHED_TOP_LEVEL = ("keras", "tensorflow")


def _watched(name):
    return name in _WATCHED_TOP_LEVEL or name.startswith("simclr_keras.")


class _ImportWatcher:
    """A meta-path finder that wraps the loaders of the watched modules to see their imports end."""

    def __init__(self):
        self.imports_running = 0
        self.done = False

    def find_spec(self, name, path=None, target=None):
        if self.done or not _watched(name):
            return None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            if finder is self or find_spec is None:
                continue
            spec = find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _WatchingLoader(spec.loader, self)
                return spec
        return None

    def import_ended(self):
        if self.done or self.imports_running or "keras" not in sys.modules:
            return
        self.done = True
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        _import_serializable_modules()


class _WatchingLoader:
    """Delegates to the real loader (runpy and inspect use its other methods); counts exec_module."""

    def __init__(self, loader, watcher):
        self._loader = loader
        self._watcher = watcher

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._watcher.imports_running += 1
        try:
            self._loader.exec_module(module)
        finally:
            self._watcher.imports_running -= 1
        self._watcher.import_ended()


def _import_serializable_modules():
    for module_name in SERIALIZABLE_MODULES:
        importlib.import_module(module_name)


def register_now_or_after_keras():
    """Imports SERIALIZABLE_MODULES now if Keras is loaded, else once it is (see the module docstring)."""
    if "keras" in sys.modules:
        _import_serializable_modules()
        return
    if not any(isinstance(finder, _ImportWatcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, _ImportWatcher())
