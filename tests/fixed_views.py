"""A deterministic stand-in for the augmenter, so that a test can compute a train step's views itself."""

import keras
import tensorflow as tf


class AlternatingViews(keras.layers.Layer):
    """Training-mode calls alternate between the images and their mirror images (floats in [0, 1]).

    A train step calls the augmenter twice, view 1 then view 2, so its views are `views(images)`.
    The alternation is decided when a call is traced, which is once per view in a compiled step.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = 0

    def call(self, images, training=False):
        images = tf.cast(images, tf.float32) / 255.0
        if not training:
            return images
        self.calls += 1
        return images if self.calls % 2 else tf.reverse(images, axis=[2])

    @staticmethod
    def views(images):
        images = tf.cast(images, tf.float32) / 255.0
        return images, tf.reverse(images, axis=[2])
