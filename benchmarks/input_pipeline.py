"""Input pipeline throughput (issue 7): decoding an image folder, and making two augmented views.

Stages, each timed on its own in one process:
  1. cold decode: `data.load_images` on the folder (list, read, decode and resize every JPEG once,
     in parallel) - what the first epoch costs; it happens once per run, before the first step.
  2. cached epoch: `data.training_batches` over the decoded images (shuffled uint8 batches from
     memory) - what every later epoch costs.
  3. two views: the SimCLR augmentation (crop + resize, flip, colour distortion, grayscale; blur
     with --use_blur) applied twice to each cached batch in a compiled function, as `train_step`
     does before the encoder.
The last line compares stage 2 + 3 with --train_images_per_s (the training throughput measured by
train_throughput.py, in images through the network per second) to show how far ahead input is.

    python benchmarks/input_pipeline.py --data_dir=../shared/datasets/cifar10 --max_examples=10000
"""

import statistics
import time

from absl import app, flags

flags.DEFINE_string("data_dir", "../shared/datasets/cifar10", "Image folder with train/<class>/*.jpg.")
flags.DEFINE_integer("max_examples", 10000, "Images decoded (class-balanced); 0: the whole split.")
flags.DEFINE_integer("batch_size", 128, "Images per batch (each gives two views).")
flags.DEFINE_integer("image_size", 32, "View size.")
flags.DEFINE_integer("batches", 30, "Batches timed in stages 2 and 3 (after 3 warm-up batches).")
flags.DEFINE_bool("use_blur", False, "Add Gaussian blur to the views (the ImageNet / STL-10 recipe).")
flags.DEFINE_float("train_images_per_s", 0.0, "Training throughput to compare with (0: no comparison).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import tensorflow as tf

    from simclr_keras import data
    from simclr_keras.augment import SimCLRAugmentation

    start = time.perf_counter()
    images, info = data.load_images(f"folder:{FLAGS.data_dir}", "train", FLAGS.image_size, max_examples=FLAGS.max_examples)
    decode_seconds = time.perf_counter() - start
    decode_rate = info.num_examples / decode_seconds
    print(f"1. cold decode: {info.num_examples} JPEGs in {decode_seconds:.1f} s = {decode_rate:.0f} images/s")

    batches = iter(data.training_batches(images, info, FLAGS.batch_size, FLAGS.image_size, seed=0))
    for _ in range(3):
        next(batches)
    times = []
    for _ in range(FLAGS.batches):
        start = time.perf_counter()
        batch, _ = next(batches)
        times.append(time.perf_counter() - start)
    cached_rate = FLAGS.batch_size / statistics.median(times)
    print(f"2. cached epoch: {cached_rate:.0f} images/s (median over {FLAGS.batches} batches)")

    augmenter = SimCLRAugmentation(FLAGS.image_size, color_jitter_strength=0.5, use_blur=FLAGS.use_blur, seed=0)

    @tf.function
    def two_views(images):
        return augmenter(images, training=True), augmenter(images, training=True)

    cached = [next(batches)[0] for _ in range(4)]
    for batch in cached[:3]:
        two_views(batch)[1].numpy()
    times = []
    for index in range(FLAGS.batches):
        start = time.perf_counter()
        two_views(cached[index % len(cached)])[1].numpy()
        times.append(time.perf_counter() - start)
    augment_rate = FLAGS.batch_size / statistics.median(times)
    print(f"3. two augmented views: {augment_rate:.0f} source images/s = {2 * augment_rate:.0f} views/s")

    # Stages 2 and 3 run one after the other for every batch after the first epoch.
    steady = 1 / (1 / cached_rate + 1 / augment_rate)
    print(f"cached epoch + two views: {steady:.0f} source images/s = {2 * steady:.0f} views/s")
    if FLAGS.train_images_per_s:
        print(f"views per second / training images per second: {2 * steady / FLAGS.train_images_per_s:.1f}x")


if __name__ == "__main__":
    app.run(main)
