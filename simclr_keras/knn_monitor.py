"""Online kNN monitor: the encoder's kNN top-1 on held-out images every N epochs of pretraining.

What lightly's `KNNBenchmarkModule` and solo-learn's online kNN give their users: a curve of how good
the representation h is while it trains, cheap enough to draw on a CPU. A fixed memory of labelled
training images (`--knn_subset` of them, or with `--knn_memory=train` all of them, as the HCL and
debiased-loss references' monitor) and a fixed set of held-out query images (`--knn_subset`) go
through the model's evaluation preprocessing and its encoder in inference mode (BatchNorm moving
statistics: nothing the training uses is touched), and `simclr_keras.evaluation.knn_classify` votes
with weights exp(similarity / T), T = `--knn_temperature` (0.1; the references use 0.5).
"""

import keras
import numpy as np

from simclr_keras import evaluation

# The evaluation command's kNN defaults (python -m simclr_keras.evaluate --protocol=knn).
DEFAULT_K = 200
DEFAULT_TEMPERATURE = 0.1
# The key of the value in the training log (train_log.jsonl, TensorBoard, training_curves.png).
LOG_KEY = "knn_top1"


class KnnMonitor(keras.callbacks.Callback):
    """Adds `knn_top1` to the logs of every step that ends an N-th epoch.

    The value goes into the step's `logs`, so a `StepLogger` placed *after* this callback writes it
    to train_log.jsonl and TensorBoard on the same line as that step's loss. Steps are global (a
    resumed run measures at the same steps as an uninterrupted one): step s is measured when s is a
    multiple of `every_n_epochs * steps_per_epoch`.

    Args:
      memory_images: uint8 [M, S, S, 3], the labelled images the kNN votes with.
      memory_labels: int [M], in [0, num_classes).
      query_images: uint8 [Q, S, S, 3], the held-out images classified.
      query_labels: int [Q].
      steps_per_epoch: optimizer steps in one epoch (> 0).
      every_n_epochs: measure every this many epochs (> 0).
      num_classes: number of classes C.
      k: neighbours (the memory size when it is smaller); temperature: of the votes exp(s / T).
      batch_size: images per encoder call.

    Attributes:
      history: [(global step, top-1)] measured by this callback.
    """

    def __init__(
        self,
        memory_images,
        memory_labels,
        query_images,
        query_labels,
        steps_per_epoch,
        every_n_epochs,
        num_classes,
        k=DEFAULT_K,
        temperature=DEFAULT_TEMPERATURE,
        batch_size=500,
    ):
        super().__init__()
        if steps_per_epoch < 1 or every_n_epochs < 1:
            raise ValueError(
                f"steps_per_epoch and every_n_epochs must be >= 1, received steps_per_epoch={steps_per_epoch}, "
                f"every_n_epochs={every_n_epochs}."
            )
        if len(memory_images) != len(memory_labels) or len(query_images) != len(query_labels):
            raise ValueError(
                f"one label per image, received {len(memory_images)} memory images for {len(memory_labels)} labels "
                f"and {len(query_images)} query images for {len(query_labels)} labels."
            )
        if len(memory_images) == 0 or len(query_images) == 0:
            raise ValueError("the kNN monitor needs at least one memory and one query image.")
        self.memory_images = np.asarray(memory_images)
        self.memory_labels = np.asarray(memory_labels, np.int64)
        self.query_images = np.asarray(query_images)
        self.query_labels = np.asarray(query_labels, np.int64)
        self.steps_per_epoch = int(steps_per_epoch)
        self.every_n_epochs = int(every_n_epochs)
        self.num_classes = int(num_classes)
        self.k = int(k)
        self.temperature = float(temperature)
        self.batch_size = int(batch_size)
        self.history = []
        self._features = None

    def _encode(self, images):
        if self._features is None:  # once: the model is set by fit, after construction
            self._features = evaluation.feature_function_from_model(self.model)
        blocks = [
            np.asarray(self._features(images[start:start + self.batch_size]), np.float32)
            for start in range(0, len(images), self.batch_size)
        ]
        return np.concatenate(blocks)  # [N, D]

    def measure(self):
        """kNN top-1 of the query images against the memory, with the model's current weights."""
        _, scores = evaluation.knn_classify(
            self._encode(self.memory_images),
            self.memory_labels,
            self._encode(self.query_images),
            self.k,
            self.temperature,
            self.num_classes,
        )
        return evaluation.top_k_accuracy(scores, self.query_labels, 1)

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if step % (self.every_n_epochs * self.steps_per_epoch):
            return
        top1 = self.measure()
        self.history.append((step, top1))
        if logs is not None:
            logs[LOG_KEY] = top1  # the same dict reaches the callbacks after this one


def load_subsets(dataset, train_split, eval_split, image_size, data_dir, subset, strict=False, memory_size=None):
    """(memory images, memory labels, query images, query labels, num_classes) for `KnnMonitor`.

    The labelled images among the first `subset` of the eval split (the queries) and the first
    `memory_size` of the training split (the memory; None: `subset`, 0: the whole split), class-balanced
    for image folders (see `simclr_keras.data.load_images`), decoded into memory once.
    """
    from simclr_keras import data

    arrays = []
    num_classes = 0
    for split, size in ((train_split, subset if memory_size is None else memory_size), (eval_split, subset)):
        images, info = data.load_images(dataset, split, image_size, data_dir, size, strict)
        images = images.filter(lambda image, label: label >= 0).batch(1024)
        pairs = [(np.asarray(block_images), np.asarray(block_labels)) for block_images, block_labels in images]
        if not pairs:
            raise ValueError(f"split {split!r} of {dataset} holds no labelled images for the kNN monitor.")
        arrays += [np.concatenate([pair[0] for pair in pairs]), np.concatenate([pair[1] for pair in pairs])]
        num_classes = max(num_classes, info.num_classes)
    return (*arrays, num_classes)
