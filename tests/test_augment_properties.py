"""Property-based tests of SimCLRAugmentation over batch sizes, image sizes, dtypes and value ranges."""

import numpy as np
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from simclr_keras.augment import SimCLRAugmentation

# A few examples each keep the file fast; deadline=None: the first call of a shape traces TF ops.
FEW = settings(max_examples=20, deadline=None)


@st.composite
def image_batches(draw):
    """(images, value_range, output size): uint8 in [0, 255] or float32 in a random (low, high)."""
    batch_size = draw(st.integers(1, 4))
    height, width = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    output_size = draw(st.integers(1, 24))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        images = rng.integers(0, 256, (batch_size, height, width, 3), dtype=np.uint8)
        return images, (0.0, 255.0), output_size
    low = draw(st.floats(-1e3, 1e3))
    high = low + draw(st.floats(1e-2, 1e3))
    images = rng.uniform(low, high, (batch_size, height, width, 3)).astype(np.float32)
    return images, (low, high), output_size


def _unit_range(images, value_range):
    """The layer's own scaling: integers / 255, floats (x - low) / (high - low)."""
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    low, high = value_range
    return ((images.astype(np.float64) - low) / (high - low)).astype(np.float32)


@FEW
@given(image_batches(), st.booleans())
def test_training_views_are_finite_in_unit_range_and_the_right_shape(batch, use_blur):
    images, value_range, output_size = batch
    layer = SimCLRAugmentation(output_size, value_range=value_range, use_blur=use_blur, seed=0)
    views = layer(images, training=True).numpy()
    assert views.shape == (images.shape[0], output_size, output_size, 3) and views.dtype == np.float32
    assert np.all(np.isfinite(views))
    assert views.min() >= 0.0 and views.max() <= 1.0


@FEW
@given(image_batches())
def test_inference_is_a_centre_crop_and_bicubic_resize_of_the_scaled_input(batch):
    images, value_range, output_size = batch
    layer = SimCLRAugmentation(output_size, value_range=value_range)
    views = layer(images, training=False).numpy()
    assert views.shape == (images.shape[0], output_size, output_size, 3)

    # For a square output the evaluation crop is the largest centred square of the image.
    height, width = images.shape[1:3]
    side = min(height, width)
    top, left = (height - side + 1) // 2, (width - side + 1) // 2
    crop = _unit_range(images, value_range)[:, top : top + side, left : left + side]
    expected = tf.clip_by_value(tf.image.resize(crop, (output_size, output_size), method="bicubic"), 0.0, 1.0)
    # The layer scales in float32: an input's rounding error, eps |x|, is divided by the range width.
    low, high = value_range
    scaling_error = 4 * np.finfo(np.float32).eps * max(abs(low), abs(high)) / (high - low)
    np.testing.assert_allclose(views, expected.numpy(), atol=1e-5 + scaling_error)
