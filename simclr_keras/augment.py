"""SimCLR view augmentation as a batched, XLA-compilable Keras 3 layer.

Implements the stochastic data augmentation of Chen et al., "A Simple Framework for
Contrastive Learning of Visual Representations", ICML 2020 (arXiv:2002.05709),
Section 3 and Appendix A, with the choices of the official google-research/simclr code
(`data_util.py`, "simclrv2" colour jitter):

1. random crop (area fraction in [0.08, 1], aspect ratio in [3/4, 4/3]) from the
   distribution of `tf.image.sample_distorted_bounding_box` as the official code calls it
   (or torchvision's `RandomResizedCrop`), resized to the output size with bicubic
   interpolation;
2. horizontal flip with probability 0.5;
3. colour distortion of strength s with probability 0.8: brightness, contrast, saturation
   (factors in [max(0, 1 - 0.8 s), 1 + 0.8 s]) and hue (shift in [-0.2 s, 0.2 s]) in a
   random order, clipping to [0, 1] after each;
4. grayscale with probability 0.2;
5. optionally (ImageNet) Gaussian blur with probability 0.5, sigma in [0.1, 2.0] and a
   kernel of about 10% of the image side.

Every random draw is made per image, and all images of a batch are processed at once with
no per-image loop. `tf.image.crop_and_resize` and bicubic `tf.image.resize` have no XLA
kernel, so cropping, resizing and blurring are all written as separable per-image linear
resampling: two small matrices per image (rows [B, out_h, H], columns [B, out_w, W])
applied with batched matrix products. Random numbers come from stateless Philox draws
converted to floats by hand, which makes a seeded call give the same views with and
without XLA.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from simclr_keras import model_config

__all__ = [
    "SimCLRAugmentation",
    "stateless_uniform",
    "CROP_SAMPLERS",
    "sample_crop_boxes",
    "sample_tensorflow_crop_boxes",
    "sample_torchvision_crop_boxes",
    "center_crop_box",
    "cubic_resize_weights",
    "separable_resample",
    "crop_and_resize",
    "gaussian_blur_weights",
    "gaussian_blur",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "to_grayscale",
    "sample_color_jitter_parameters",
    "color_jitter",
]

# Keys (1981) cubic convolution parameter used by tf.image.resize(method="bicubic").
_KEYS_A = -0.5
# TF's ResizeBicubic kernel looks its weights up in a table indexed by the fractional
# sample offset rounded to 1/1024 pixel; rounding the same way makes our matrices agree
# with tf.image.resize to float precision instead of ~5e-4.
_RESIZE_TABLE_SIZE = 1024
# ITU-R BT.601 luma weights, as tf.image.rgb_to_grayscale.
_GRAYSCALE_WEIGHTS = (0.2989, 0.5870, 0.1140)
# Floats are built from 24 random bits (the float32 mantissa) by hand because XLA and the
# TF kernel turn Philox bits into floats differently; integer draws agree on both.
_UNIFORM_BITS = 24
# Indices of the four colour operations in a jitter order.
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 0, 1, 2, 3


# --------------------------------------------------------------------------------------
# Randomness
# --------------------------------------------------------------------------------------


def _as_seed(seed):
    """Returns `seed` as a non-negative int32 tensor of shape [2], the stateless-op format.

    XLA and the TF kernels turn a seed into a Philox key differently when an element is
    negative or wider than 32 bits, so every seed is reduced to 31 bits per element.
    """
    seed = tf.convert_to_tensor(seed)
    if seed.dtype != tf.int32:
        # Wraps int64 values modulo 2**32, the same way with and without XLA.
        seed = tf.cast(seed, tf.int32)
    return tf.bitwise.bitwise_and(tf.reshape(seed, [2]), 0x7FFFFFFF)


def _distinct_per_replica(seed):
    """Folds the replica id into `seed` inside a multi-replica `strategy.run`.

    The seed generator's state is mirrored, so every replica would otherwise draw the same views
    for its share of the batch (the pitfall of Keras' core random layers under tf.distribute).
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return seed
    replica_id = tf.cast(context.replica_id_in_sync_group, tf.int32)
    return tf.random.experimental.stateless_fold_in(_as_seed(seed), replica_id)


def _split_seed(seed, count):
    """Returns `count` independent [2] seeds derived from `seed`."""
    seeds = tf.random.experimental.stateless_split(_as_seed(seed), num=count)
    return [_as_seed(one) for one in tf.unstack(seeds, num=count)]


def stateless_uniform(seed, shape, minval=0.0, maxval=1.0):
    """Uniform float32 samples between minval and maxval, a deterministic function of `seed`.

    The unit draw lies on the grid k / 2**24, k < 2**24, so `stateless_uniform(...) < p`
    is True with probability exactly p for p in {0, 1}. Unlike `tf.random.stateless_uniform`
    for floats, the values are identical inside and outside an XLA cluster (see
    `_UNIFORM_BITS`).

    Args:
        seed: integer tensor of shape [2].
        shape: output shape.
        minval, maxval: float scalars or tensors broadcastable to `shape`.
    """
    bits = tf.random.stateless_uniform(
        shape, _as_seed(seed), minval=0, maxval=2**_UNIFORM_BITS, dtype=tf.int32, alg="philox"
    )
    unit = tf.cast(bits, tf.float32) * (2.0**-_UNIFORM_BITS)
    minval = tf.cast(minval, tf.float32)
    maxval = tf.cast(maxval, tf.float32)
    return minval + (maxval - minval) * unit


def _bernoulli(seed, batch_size, probability):
    """Boolean [B] mask, each entry True with `probability`."""
    return stateless_uniform(seed, [batch_size]) < probability


# --------------------------------------------------------------------------------------
# Crop boxes
# --------------------------------------------------------------------------------------


CROP_SAMPLERS = ("tensorflow", "torchvision")
# Whether each image draws its blur sigma, or one call (a view of a batch) draws one for all.
BLUR_SIGMA_SCOPES = model_config.BLUR_SIGMA_SCOPES
# The official evaluation centre crop keeps this fraction of the image side above 32 px.
OFFICIAL_CROP_PROPORTION = 0.875
# Keys of a padded batch of images of different sizes (see SimCLRAugmentation).
PADDED_IMAGES = "images"
IMAGE_SHAPES = "image_shapes"


def _per_image_sides(batch_size, image_height, image_width):
    """Image heights and widths as int32 [B, 1] and float32 [B, 1], from scalars or [B] tensors."""
    heights = tf.broadcast_to(tf.reshape(tf.cast(image_height, tf.int32), [-1]), [batch_size])[:, None]
    widths = tf.broadcast_to(tf.reshape(tf.cast(image_width, tf.int32), [-1]), [batch_size])[:, None]
    return heights, widths, tf.cast(heights, tf.float32), tf.cast(widths, tf.float32)


def _uniform_integer(seed, shape, count):
    """Uniform integers in [0, count) for float or int `count` >= 1 (broadcast to `shape`)."""
    count = tf.cast(count, tf.float32)
    draws = tf.floor(stateless_uniform(seed, shape) * count)
    return tf.minimum(draws, count - 1.0)  # guards float rounding of u * count


def sample_tensorflow_crop_boxes(
    seed,
    batch_size,
    image_height,
    image_width,
    area_range=(0.08, 1.0),
    aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0),
    min_object_covered=0.1,
    attempts=100,
):
    """One crop box per image from the distribution of `tf.image.sample_distorted_bounding_box`.

    The official SimCLR code draws its crops with that op (whole image as the only bounding box,
    `min_object_covered=0.1`, 100 attempts); this is the op's kernel (`GenerateRandomCrop`),
    vectorised over [B, attempts] candidates so that it compiles with XLA. A candidate draws an
    aspect ratio r (width / height) uniformly in `aspect_ratio_range` (a linear scale) and then
    its height uniformly among the integers whose box h x round(r h) has an area in `area_range`
    of the image and fits, with the kernel's one-pixel corrections for rounding. Because the
    height, not the area, is uniform, small crops are more frequent than under torchvision's
    sampler. A candidate must also cover `min_object_covered` of the image (of the whole-image
    box), so areas below 0.1 are redrawn. The first valid candidate is used, at an offset
    uniform in [0, H - h - 1] (the kernel's `Uniform(H - h)`; 0 when h = H); with none valid,
    the whole image.

    Args:
        seed: integer tensor of shape [2].
        batch_size: number of boxes B (int or scalar tensor).
        image_height, image_width: image size in pixels, scalars or int [B] (one per image).

    Returns:
        (tops, lefts, heights, widths), each int32 [B].
    """
    ratio_seed, height_seed, top_seed, left_seed = _split_seed(seed, 4)
    image_heights, image_widths, height, width = _per_image_sides(batch_size, image_height, image_width)
    shape = [batch_size, attempts]

    # [B, attempts] candidates; float32 and round-half-to-even as the kernel's floats and lrintf.
    ratio = stateless_uniform(ratio_seed, shape, *aspect_ratio_range)
    min_area = area_range[0] * width * height  # [B, 1]
    max_area = area_range[1] * width * height
    low = tf.math.rint(tf.sqrt(min_area / ratio))
    high = tf.math.rint(tf.sqrt(max_area / ratio))
    # The tallest box whose rounded width still fits in the image.
    widest = tf.floor((width + 0.5 - 1e-7) / ratio)
    widest = tf.where(tf.math.rint(widest * ratio) > width, widest - 1.0, widest)
    high = tf.where(tf.math.rint(high * ratio) > width, widest, high)
    high = tf.minimum(high, height)
    low = tf.minimum(low, high)
    heights = low + _uniform_integer(height_seed, shape, tf.maximum(high - low + 1.0, 1.0))
    widths = tf.math.rint(heights * ratio)
    # One pixel taller if rounding left the area too small, one shorter if too large.
    too_small = widths * heights < min_area
    heights = tf.where(too_small, heights + 1.0, heights)
    widths = tf.where(too_small, tf.math.rint(heights * ratio), widths)
    too_large = widths * heights > max_area
    heights = tf.where(too_large, heights - 1.0, heights)
    widths = tf.where(too_large, tf.math.rint(heights * ratio), widths)
    areas = widths * heights
    valid = (
        (areas >= min_area)
        & (areas <= max_area)
        & (widths <= width)
        & (heights <= height)
        & (widths > 0)
        & (heights > 0)
        # The overlap constraint with the whole image as the object box.
        & (areas >= 1.0)
        & (areas / (width * height) >= min_object_covered)
    )
    first_valid = tf.argmax(tf.cast(valid, tf.int32), axis=1, output_type=tf.int32)
    any_valid = tf.reduce_any(valid, axis=1)
    heights = tf.cast(tf.gather(heights, first_valid, batch_dims=1), tf.int32)
    widths = tf.cast(tf.gather(widths, first_valid, batch_dims=1), tf.int32)
    image_heights, image_widths = image_heights[:, 0], image_widths[:, 0]
    heights = tf.where(any_valid, heights, image_heights)
    widths = tf.where(any_valid, widths, image_widths)

    def offset(offset_seed, slack):
        return tf.cast(_uniform_integer(offset_seed, [batch_size], tf.maximum(slack, 1)), tf.int32)

    tops = tf.where(any_valid, offset(top_seed, image_heights - heights), 0)
    lefts = tf.where(any_valid, offset(left_seed, image_widths - widths), 0)
    return tops, lefts, heights, widths


def sample_torchvision_crop_boxes(
    seed,
    batch_size,
    image_height,
    image_width,
    area_range=(0.08, 1.0),
    aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0),
    attempts=10,
):
    """One crop box per image from torchvision's `RandomResizedCrop` (lightly, solo-learn).

    The `RandomResizedCrop.get_params` algorithm, vectorised: every image
    draws `attempts` candidates at once, each with an area fraction uniform in
    `area_range` and a log aspect ratio (width / height) uniform in
    log(`aspect_ratio_range`), sized w = round(sqrt(area * ratio)),
    h = round(sqrt(area / ratio)). The first candidate that fits in the image is used,
    at an offset uniform among all valid integer positions. If none fits, the box is
    the largest centred box whose aspect ratio lies in the range (the whole image when
    the image's own aspect ratio does).

    Args:
        seed: integer tensor of shape [2].
        batch_size: number of boxes B (int or scalar tensor).
        image_height, image_width: image size in pixels, scalars or int [B] (one per image).

    Returns:
        (tops, lefts, heights, widths), each int32 [B].
    """
    area_seed, ratio_seed, top_seed, left_seed = _split_seed(seed, 4)
    image_height, image_width, height, width = _per_image_sides(batch_size, image_height, image_width)
    shape = [batch_size, attempts]

    # [B, attempts] candidate boxes.
    target_area = height * width * stateless_uniform(area_seed, shape, *area_range)
    log_ratio_range = (math.log(aspect_ratio_range[0]), math.log(aspect_ratio_range[1]))
    ratio = tf.exp(stateless_uniform(ratio_seed, shape, *log_ratio_range))
    # tf.round rounds half to even, like Python's round() in torchvision.
    candidate_widths = tf.cast(tf.round(tf.sqrt(target_area * ratio)), tf.int32)
    candidate_heights = tf.cast(tf.round(tf.sqrt(target_area / ratio)), tf.int32)
    fits = (
        (candidate_widths > 0)
        & (candidate_widths <= image_width)
        & (candidate_heights > 0)
        & (candidate_heights <= image_height)
    )
    first_fit = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
    any_fit = tf.reduce_any(fits, axis=1)

    # Fallback: clamp the image's aspect ratio into the range and centre the box. [B]
    image_height, image_width, height, width = image_height[:, 0], image_width[:, 0], height[:, 0], width[:, 0]
    image_ratio = width / height
    min_ratio, max_ratio = aspect_ratio_range
    fallback_width = tf.where(
        image_ratio > max_ratio, tf.cast(tf.round(height * max_ratio), tf.int32), image_width
    )
    fallback_height = tf.where(
        image_ratio < min_ratio, tf.cast(tf.round(width / min_ratio), tf.int32), image_height
    )

    heights = tf.where(
        any_fit, tf.gather(candidate_heights, first_fit, batch_dims=1), fallback_height
    )
    widths = tf.where(
        any_fit, tf.gather(candidate_widths, first_fit, batch_dims=1), fallback_width
    )

    def random_offset(offset_seed, slack):
        # Uniform integer in [0, slack].
        return tf.cast(_uniform_integer(offset_seed, [batch_size], slack + 1), tf.int32)

    tops = tf.where(
        any_fit, random_offset(top_seed, image_height - heights), (image_height - heights) // 2
    )
    lefts = tf.where(
        any_fit, random_offset(left_seed, image_width - widths), (image_width - widths) // 2
    )
    return tops, lefts, heights, widths


def sample_crop_boxes(
    seed,
    batch_size,
    image_height,
    image_width,
    area_range=(0.08, 1.0),
    aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0),
    sampler="tensorflow",
):
    """One random crop box per image from `sampler`: "tensorflow" (the official SimCLR code's
    `tf.image.sample_distorted_bounding_box`, `sample_tensorflow_crop_boxes`) or "torchvision"
    (`RandomResizedCrop`, `sample_torchvision_crop_boxes`); same arguments and returns."""
    if sampler == "tensorflow":
        return sample_tensorflow_crop_boxes(
            seed, batch_size, image_height, image_width, area_range, aspect_ratio_range
        )
    if sampler == "torchvision":
        return sample_torchvision_crop_boxes(
            seed, batch_size, image_height, image_width, area_range, aspect_ratio_range
        )
    raise ValueError(f"crop_sampler must be one of {CROP_SAMPLERS}, got crop_sampler={sampler!r}.")


def center_crop_box(image_height, image_width, output_height, output_width, crop_fraction=1.0):
    """The deterministic evaluation crop of the official SimCLR code (`center_crop`).

    Takes the largest centred box with the output's aspect ratio and scales it by
    `crop_fraction` (the official `CROP_PROPORTION = 0.875` above 32 px), rounding to whole
    pixels. For a square image and square output with crop_fraction=1 this is the whole image.

    Args:
        image_height, image_width: scalars, or int [B] for one box per image.

    Returns:
        (top, left, height, width) as int32, scalars or [B] like the image sizes.
    """
    height = tf.cast(image_height, tf.float32)
    width = tf.cast(image_width, tf.float32)
    aspect_ratio = output_width / output_height
    output_wider = aspect_ratio > width / height
    # The box spans `crop_fraction` of the image along its limiting side.
    crop_height = tf.where(
        output_wider, crop_fraction / aspect_ratio * width, crop_fraction * height
    )
    crop_width = tf.where(
        output_wider, crop_fraction * width, crop_fraction * aspect_ratio * height
    )
    crop_height = tf.maximum(tf.cast(tf.math.rint(crop_height), tf.int32), 1)
    crop_width = tf.maximum(tf.cast(tf.math.rint(crop_width), tf.int32), 1)
    top = (tf.cast(image_height, tf.int32) - crop_height + 1) // 2
    left = (tf.cast(image_width, tf.int32) - crop_width + 1) // 2
    return top, left, crop_height, crop_width


# --------------------------------------------------------------------------------------
# Separable resampling: crop + bicubic resize and Gaussian blur as per-image matrices
# --------------------------------------------------------------------------------------


def _keys_cubic(distance):
    """Keys (1981) cubic convolution kernel with a = -0.5, supported on |x| < 2."""
    x = tf.abs(distance)
    a = _KEYS_A
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return tf.where(x <= 1.0, near, tf.where(x < 2.0, far, tf.zeros_like(x)))


def cubic_resize_weights(starts, lengths, input_size, output_size):
    """Bicubic interpolation matrices resampling a window of one image axis.

    Row o of image b's matrix holds the weights that
    `tf.image.resize(window, ..., method="bicubic", antialias=False)` gives the input
    pixels when it resamples the window [starts[b], starts[b] + lengths[b]) of an axis to
    `output_size` pixels: half-pixel centres, the Keys kernel (a = -0.5) on the four
    nearest samples, taps that fall outside the window dropped and the rest renormalised
    to sum to one, and offsets rounded to 1/1024 pixel as TF's coefficient table does.

    Args:
        starts, lengths: int [B] window starts and lengths (pixels), inside the axis.
        input_size: length of the axis (int or scalar tensor).
        output_size: int, number of output pixels.

    Returns:
        float32 [B, output_size, input_size].
    """
    starts = tf.cast(tf.reshape(starts, [-1, 1, 1]), tf.float32)
    lengths = tf.cast(tf.reshape(lengths, [-1, 1, 1]), tf.float32)
    outputs = tf.reshape(tf.range(output_size, dtype=tf.float32), [1, -1, 1])
    inputs = tf.reshape(tf.range(input_size, dtype=tf.float32), [1, 1, -1])

    # [B, output_size, 1] sample position relative to the window start.
    position = (outputs + 0.5) * (lengths / output_size) - 0.5
    whole = tf.floor(position)
    position = whole + tf.round((position - whole) * _RESIZE_TABLE_SIZE) / _RESIZE_TABLE_SIZE

    # [B, output_size, input_size]
    weights = _keys_cubic(starts + position - inputs)
    inside = (inputs >= starts) & (inputs < starts + lengths)
    weights = tf.where(inside, weights, tf.zeros_like(weights))
    # The nearest in-window tap always has weight >= 0.56, so the sum is never zero.
    return weights / tf.reduce_sum(weights, axis=-1, keepdims=True)


def separable_resample(images, row_weights, column_weights):
    """Applies a per-image separable linear map: out[b] = R[b] @ images[b] @ C[b]^T.

    Args:
        images: float32 [B, H, W, C].
        row_weights: float32 [B, out_h, H].
        column_weights: float32 [B, out_w, W].

    Returns:
        float32 [B, out_h, out_w, C].
    """
    rows_done = tf.einsum("boh,bhwc->bowc", row_weights, images)
    return tf.einsum("bpw,bowc->bopc", column_weights, rows_done)


def crop_and_resize(images, tops, lefts, heights, widths, output_size):
    """Crops an integer box from each image and resizes it bicubically.

    Equals `tf.image.resize(images[b, top:top+height, left:left+width], output_size,
    method="bicubic")` per image (including its border handling), but batched and
    XLA-compilable.

    Args:
        images: float32 [B, H, W, C].
        tops, lefts, heights, widths: int [B] boxes inside the images.
        output_size: int or (height, width).

    Returns:
        float32 [B, out_h, out_w, C].
    """
    output_height, output_width = _pair(output_size)
    shape = tf.shape(images)
    row_weights = cubic_resize_weights(tops, heights, shape[1], output_height)
    column_weights = cubic_resize_weights(lefts, widths, shape[2], output_width)
    return separable_resample(images, row_weights, column_weights)


def gaussian_blur_weights(sigmas, size, radius, padding="reflect"):
    """Banded matrices of a 1-D Gaussian blur with one sigma per image.

    The filter is exp(-x^2 / (2 sigma^2)) on x = -radius..radius, normalised to sum to one,
    as in the official SimCLR `gaussian_blur`. With `padding="reflect"` the border is
    handled as by `tf.pad(..., mode="REFLECT")` (mirroring without repeating the edge
    pixel), folded into the matrix; with `padding="zeros"` taps outside the image are
    dropped without renormalisation, which is the official code's `padding="SAME"`
    depthwise convolution.

    Args:
        sigmas: float [B] standard deviations in pixels.
        size: int, length of the blurred axis.
        radius: int, half-width of the filter (needs radius < size for reflection).

    Returns:
        float32 [B, size, size]; row i holds the weights of output pixel i.
    """
    if padding not in ("reflect", "zeros"):
        raise ValueError(f"padding must be 'reflect' or 'zeros', got {padding!r}.")
    if padding == "reflect" and size > 1 and radius >= size:
        raise ValueError(f"Reflect padding needs radius < size, got {radius} and {size}.")
    sigmas = tf.reshape(tf.cast(sigmas, tf.float32), [-1, 1])
    offsets = np.arange(-radius, radius + 1)
    # [B, 2 * radius + 1]
    taps = tf.exp(-tf.constant(offsets**2, tf.float32) / (2.0 * tf.square(sigmas)))
    taps = taps / tf.reduce_sum(taps, axis=1, keepdims=True)

    # Constant [size, 2 * radius + 1, size] one-hot map from (output pixel, tap) to the
    # source pixel after padding; a row of zeros drops a tap.
    sources = np.arange(size)[:, None] + offsets[None, :]
    if padding == "reflect" and size > 1:
        sources = np.abs(sources)
        sources = np.where(sources > size - 1, 2 * (size - 1) - sources, sources)
    elif padding == "reflect":
        sources = np.zeros_like(sources)
    scatter = (sources[:, :, None] == np.arange(size)[None, None, :]).astype(np.float32)
    return tf.einsum("bk,ikj->bij", taps, tf.constant(scatter))


def gaussian_blur(images, sigmas, radius, padding="reflect"):
    """Separable Gaussian blur of each image with its own sigma.

    Args:
        images: float32 [B, H, W, C].
        sigmas: float [B].
        radius: int, filter half-width; SimCLR uses (image_size // 10) // 2.

    Returns:
        float32 [B, H, W, C].
    """
    height, width = images.shape[1], images.shape[2]
    row_weights = gaussian_blur_weights(sigmas, height, radius, padding)
    column_weights = gaussian_blur_weights(sigmas, width, radius, padding)
    return separable_resample(images, row_weights, column_weights)


# --------------------------------------------------------------------------------------
# Colour operations with per-image factors. Images are float32 [B, H, W, 3] in [0, 1];
# factors are [B]. Each op matches its tf.image counterpart applied image by image.
# --------------------------------------------------------------------------------------


def _per_image(factors):
    return tf.reshape(tf.cast(factors, tf.float32), [-1, 1, 1, 1])


def _select(mask, when_true, when_false):
    """Per-image choice between two finite float tensors; `mask` is bool [B, 1, 1(, 1)].

    A 0/1 blend is exact for finite values and several times faster than a broadcasting
    `tf.where` on CPU outside XLA (as in tf.data pipelines).
    """
    mask = tf.cast(mask, when_true.dtype)
    return when_true * mask + when_false * (1.0 - mask)


def adjust_brightness(images, factors):
    """Multiplicative brightness change (official SimCLR "simclrv2" brightness)."""
    return images * _per_image(factors)


def adjust_contrast(images, factors):
    """Per-image `tf.image.adjust_contrast`: (x - mean) * factor + mean per channel."""
    means = tf.reduce_mean(images, axis=[1, 2], keepdims=True)
    return (images - means) * _per_image(factors) + means


def _value_and_chroma(images):
    """HSV value V = max(r, g, b) and chroma C = V - min(r, g, b), each [B, H, W, 1], and the channels."""
    red, green, blue = tf.unstack(images, axis=-1)  # [B, H, W] each
    value = tf.maximum(red, tf.maximum(green, blue))
    chroma = value - tf.minimum(red, tf.minimum(green, blue))
    return (red, green, blue), value[..., None], chroma[..., None]


def _saturation_scale(value, chroma, factors):
    """Per-pixel k [B, H, W, 1] with which c -> V - k (V - c) scales the HSV saturation S = C / V.

    The map keeps V and the hue and multiplies C by k, so S becomes clip(S * factor, 0, 1) for
    k = min(factor S, 1) / S = min(factor, V / C); k is 0 where C = 0 (gray: nothing to scale)
    and where V <= 0, where `tf.image.adjust_saturation` sets S to 0 (only bicubic overshoot
    below 0 gets there; `adjust_hue` keeps C there, as `tf.image.adjust_hue` does).
    """
    return tf.maximum(tf.minimum(_per_image(factors), tf.math.divide_no_nan(value, chroma)), 0.0)


def _rotated_hue_colours(channels, value, chroma, deltas):
    """RGB [B, H, W, 3] of the same V and C with the hue (in turns) rotated by a per-image delta.

    The hue in sixths of a turn is TF's `rgb_to_hsv` formula; the colour of hue h is
    V - C clip(min(k, 4 - k), 0, 1) with k = (n + 6 h) mod 6, n = 5, 3, 1 for r, g, b (the
    closed form of `hsv_to_rgb`'s six sectors), whose modulo also wraps the rotated hue.
    """
    red, green, blue = channels
    value, chroma = value[..., 0], chroma[..., 0]
    inverse_chroma = tf.math.divide_no_nan(tf.ones_like(chroma), chroma)
    sixths = tf.where(
        red == value,
        (green - blue) * inverse_chroma,
        tf.where(green == value, (blue - red) * inverse_chroma + 2.0, (red - green) * inverse_chroma + 4.0),
    )  # [B, H, W], in (-1, 5]
    sixths = (sixths + 6.0 * _per_image(deltas)[..., 0])[..., None]
    sector = sixths + tf.constant([5.0, 3.0, 1.0])  # [B, H, W, 3]
    sector = sector - 6.0 * tf.floor(sector / 6.0)  # in [0, 6); tf.math.floormod took 2.5x as long under XLA
    return value[..., None] - chroma[..., None] * tf.clip_by_value(tf.minimum(sector, 4.0 - sector), 0.0, 1.0)


def adjust_saturation(images, factors):
    """Per-image `tf.image.adjust_saturation`: S = clip(S * factor, 0, 1) in HSV, computed in RGB."""
    _, value, chroma = _value_and_chroma(images)
    scale = _saturation_scale(value, chroma, factors)
    return value - scale * (value - images)


def adjust_hue(images, deltas):
    """Per-image `tf.image.adjust_hue`: H = (H + delta) mod 1 in HSV, computed in RGB."""
    channels, value, chroma = _value_and_chroma(images)
    return _rotated_hue_colours(channels, value, chroma, deltas)


def to_grayscale(images):
    """`tf.image.rgb_to_grayscale` tiled back to three channels: [B, H, W, 3]."""
    gray = tf.reduce_sum(images * tf.constant(_GRAYSCALE_WEIGHTS, tf.float32), axis=-1)
    return tf.tile(gray[..., None], [1, 1, 1, 3])


def sample_color_jitter_parameters(seed, batch_size, strength=1.0):
    """Draws per-image colour-jitter parameters of strength s (SimCLR Appendix A).

    Returns a dict of [B] tensors: "brightness", "contrast" and "saturation" factors
    uniform in [max(0, 1 - 0.8 s), 1 + 0.8 s], "hue" shifts uniform in [-0.2 s, 0.2 s],
    and "order", int32 [B, 4], a uniformly random permutation of the four operations
    (0 brightness, 1 contrast, 2 saturation, 3 hue) giving the order they are applied in.
    """
    seeds = _split_seed(seed, 5)
    low, high = max(0.0, 1.0 - 0.8 * strength), 1.0 + 0.8 * strength
    max_hue = 0.2 * strength
    return {
        "brightness": stateless_uniform(seeds[0], [batch_size], low, high),
        "contrast": stateless_uniform(seeds[1], [batch_size], low, high),
        "saturation": stateless_uniform(seeds[2], [batch_size], low, high),
        "hue": stateless_uniform(seeds[3], [batch_size], -max_hue, max_hue),
        # Sorting i.i.d. uniforms gives a uniformly random permutation.
        "order": tf.argsort(stateless_uniform(seeds[4], [batch_size, 4]), axis=1),
    }


def color_jitter(images, parameters):
    """Applies the four colour operations in each image's own order, clipping after each.

    At each of the four steps every image needs one operation. Brightness, contrast and
    saturation are all affine maps of the RGB values (c -> scale c + offset: a per-image scale
    for the first two, a per-pixel one for saturation, see `_saturation_scale`), so one
    multiply-add with each image's own coefficients applies whichever of them it needs; the hue
    rotation is computed for the whole batch and kept where an image needs it. Everything stays
    batched, and nothing converts to HSV and back (op by op on a CPU, `tf.image.rgb_to_hsv` took
    39% of the op time of a loop that did).

    Args:
        images: float32 [B, H, W, 3].
        parameters: dict from `sample_color_jitter_parameters`.

    Returns:
        float32 [B, H, W, 3] in [0, 1].
    """
    contrast = _per_image(parameters["contrast"])
    for step in range(4):
        operation = tf.reshape(parameters["order"][:, step], [-1, 1, 1, 1])
        # 0/1 per image [B, 1, 1, 1]: which operation this step applies.
        brightness_step, contrast_step, saturation_step, hue_step = (
            tf.cast(operation == index, tf.float32) for index in (_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE)
        )
        channels, value, chroma = _value_and_chroma(images)
        saturation_scale = saturation_step * _saturation_scale(value, chroma, parameters["saturation"])
        # [B, H, W, 1]; 0 for the hue images, whose colours come from the rotation alone.
        scale = brightness_step * _per_image(parameters["brightness"]) + contrast_step * contrast + saturation_scale
        means = tf.reduce_mean(images, axis=[1, 2], keepdims=True)  # [B, 1, 1, 3]
        offset = contrast_step * (1.0 - contrast) * means + (saturation_step - saturation_scale) * value
        hue = hue_step * _rotated_hue_colours(channels, value, chroma, parameters["hue"])
        images = tf.clip_by_value(images * scale + offset + hue, 0.0, 1.0)
    return images


# --------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------


def _pair(size):
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    height, width = size
    return int(height), int(width)


def _check_range(name, value_range, low=None, high=None):
    first, second = value_range
    if first > second:
        raise ValueError(f"{name} must be (low, high) with low <= high, got {value_range}.")
    if (low is not None and first < low) or (high is not None and second > high):
        raise ValueError(f"{name} must lie within [{low}, {high}], got {value_range}.")
    return (float(first), float(second))


def _check_probability(name, value):
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}.")
    return float(value)


@keras.saving.register_keras_serializable(package="simclr_keras")
class SimCLRAugmentation(keras.layers.Layer):
    """SimCLR's random view augmentation (Chen et al. 2020, arXiv:2002.05709, App. A).

    In training mode every image of a batch independently gets, in this order: a random
    resized crop (bicubic), a horizontal flip, a colour distortion (random-order
    brightness, contrast, saturation and hue, applied with `color_jitter_probability`),
    grayscale conversion and, if `use_blur`, a Gaussian blur; see the module docstring.
    In inference mode it only centre-crops `eval_crop_fraction` of the image and resizes
    it with the same bicubic interpolation. The output is always float32 in [0, 1], the
    scale of the official code.

    Images of different sizes enter as a padded batch, the format of `simclr_keras.data` for
    such datasets: a dict {"images": [B, H, W, 3], each image in the top-left corner,
    "image_shapes": int [B, 2] (height, width)}. Crops are then drawn from each image's own
    pixels at its own resolution; the padding is never read.

    The whole computation is batched and compiles with XLA (`jit_compile=True`). When a
    `seed` tensor is passed to `call`, only stateless random ops are used, so the output
    is a deterministic function of (images, seed) — use this inside `tf.data` pipelines
    with parallel `map`. Without it a seed is drawn from the layer's
    `keras.random.SeedGenerator`, so successive calls give different views.

    Args:
        image_size: output side (int) or (height, width).
        crop_area_range: range of the crop's area as a fraction of the image area.
        aspect_ratio_range: range of the crop's width / height (for "tensorflow", multiplied by
            the output's width / height, as the official code does).
        crop_sampler: "tensorflow" (default): the distribution of
            `tf.image.sample_distorted_bounding_box` with `min_object_covered=0.1` and 100
            attempts, as the official SimCLR code; "torchvision": `RandomResizedCrop`'s (area
            uniform, log-uniform aspect ratio), as lightly and solo-learn. See `sample_crop_boxes`.
        flip_probability: probability of a horizontal flip.
        color_jitter_strength: s; factors in [max(0, 1 - 0.8 s), 1 + 0.8 s] and hue
            shifts in [-0.2 s, 0.2 s]. The paper uses 1.0 on ImageNet, 0.5 on CIFAR-10.
        color_jitter_probability: probability of applying the colour distortion.
        grayscale_probability: probability of converting to grayscale.
        use_blur: whether to blur (the paper blurs on ImageNet, not on CIFAR-10).
        blur_probability: probability of blurring an image when `use_blur`.
        blur_sigma_range: range of the blur's standard deviation in pixels.
        value_range: (low, high) range of floating-point inputs; integer inputs are taken
            to be in [0, 255].
        eval_crop_fraction: fraction of the image side kept by the inference centre crop
            (1.0 keeps the whole image when its aspect ratio matches the output's). None (the
            default): the official rule, 0.875 when the output is above 32 px, else 1.0.
        seed: int seed of the layer's seed generator, or None for a random one.
        blur_padding: "reflect" (default) or "zeros" (the official code's "SAME" padding); see
            `gaussian_blur_weights`.
        blur_sigma_per: "image" (default): each image draws its own blur sigma; "batch": one sigma
            for every image of a call, i.e. of one view of a (per-replica) batch, as the official
            code's `batch_random_blur` (whether each image is blurred is still drawn per image).
        jit_compile: whether the training view runs as one XLA computation: "auto" (default)
            compiles it when the layer is called inside a `tf.function` (a Keras train step, a
            `tf.data` map) and runs eager calls op by op, without a compilation wait; True or
            False always or never. XLA fuses the colour operations' elementwise passes (on a
            2-core CPU the training view of 256 32x32 images took about 11 ms compiled, 38 ms op
            by op); the views agree to float rounding (see `test_xla_matches_eager_for_the_same_seed`).
    """

    def __init__(
        self,
        image_size,
        crop_area_range=(0.08, 1.0),
        aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0),
        flip_probability=0.5,
        color_jitter_strength=1.0,
        color_jitter_probability=0.8,
        grayscale_probability=0.2,
        use_blur=False,
        blur_probability=0.5,
        blur_sigma_range=(0.1, 2.0),
        value_range=(0.0, 255.0),
        eval_crop_fraction=None,
        seed=None,
        blur_padding="reflect",
        crop_sampler="tensorflow",
        jit_compile="auto",
        blur_sigma_per="image",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.output_height, self.output_width = _pair(image_size)
        if isinstance(image_size, (int, np.integer)):
            self.image_size = int(image_size)
        else:
            self.image_size = (self.output_height, self.output_width)
        if self.output_height < 1 or self.output_width < 1:
            raise ValueError(f"image_size must be positive, got {image_size}.")
        self.crop_area_range = _check_range("crop_area_range", crop_area_range, 0.0, 1.0)
        if self.crop_area_range[1] <= 0.0:
            raise ValueError(f"crop_area_range must allow a positive area, got {crop_area_range}.")
        self.aspect_ratio_range = _check_range("aspect_ratio_range", aspect_ratio_range)
        if self.aspect_ratio_range[0] <= 0.0:
            raise ValueError(f"aspect_ratio_range must be positive, got {aspect_ratio_range}.")
        self.flip_probability = _check_probability("flip_probability", flip_probability)
        if color_jitter_strength < 0:
            raise ValueError(f"color_jitter_strength must be >= 0, got {color_jitter_strength}.")
        self.color_jitter_strength = float(color_jitter_strength)
        self.color_jitter_probability = _check_probability(
            "color_jitter_probability", color_jitter_probability
        )
        self.grayscale_probability = _check_probability(
            "grayscale_probability", grayscale_probability
        )
        self.use_blur = bool(use_blur)
        self.blur_probability = _check_probability("blur_probability", blur_probability)
        self.blur_sigma_range = _check_range("blur_sigma_range", blur_sigma_range)
        if self.blur_sigma_range[0] <= 0.0:
            raise ValueError(f"blur_sigma_range must be positive, got {blur_sigma_range}.")
        if value_range[1] <= value_range[0]:
            raise ValueError(f"value_range must be (low, high), low < high, got {value_range}.")
        self.value_range = (float(value_range[0]), float(value_range[1]))
        if eval_crop_fraction is None:
            # The official code's test_crop: CROP_PROPORTION above 32 px (ImageNet), none on CIFAR.
            eval_crop_fraction = OFFICIAL_CROP_PROPORTION if max(self.output_height, self.output_width) > 32 else 1.0
        if not 0.0 < eval_crop_fraction <= 1.0:
            raise ValueError(f"eval_crop_fraction must be in (0, 1], got {eval_crop_fraction}.")
        self.eval_crop_fraction = float(eval_crop_fraction)
        if blur_padding not in model_config.BLUR_PADDINGS:
            raise ValueError(f"blur_padding must be 'reflect' or 'zeros', got blur_padding={blur_padding!r}.")
        self.blur_padding = blur_padding
        if blur_sigma_per not in BLUR_SIGMA_SCOPES:
            raise ValueError(
                f"blur_sigma_per must be one of {BLUR_SIGMA_SCOPES}, got blur_sigma_per={blur_sigma_per!r}."
            )
        self.blur_sigma_per = blur_sigma_per
        if crop_sampler not in CROP_SAMPLERS:
            raise ValueError(f"crop_sampler must be one of {CROP_SAMPLERS}, got crop_sampler={crop_sampler!r}.")
        self.crop_sampler = crop_sampler
        if jit_compile not in ("auto", True, False):
            raise ValueError(f"jit_compile must be 'auto', True or False, got jit_compile={jit_compile!r}.")
        self.jit_compile = jit_compile
        # Settings -> compiled `_training_view`; set through __dict__ so that neither Keras nor
        # TensorFlow tracks it (a SavedModel would otherwise carry the training view as a function).
        self.__dict__["_compiled_training_views"] = {}
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        # Inputs are often uint8; Keras must not cast them to the compute dtype first.
        self._convert_input_args = False
        self._allow_non_tensor_positional_args = True

    @property
    def blur_radius(self):
        """Filter half-width: the official kernel side is image_height // 10, made odd."""
        return (self.output_height // 10) // 2

    def _to_unit_range(self, images):
        if images.dtype.is_integer:
            return tf.cast(images, tf.float32) / 255.0
        low, high = self.value_range
        images = tf.cast(images, tf.float32)
        if (low, high) == (0.0, 1.0):
            return images
        return (images - low) / (high - low)

    def _evaluation_view(self, images, image_heights, image_widths):
        boxes = center_crop_box(
            image_heights, image_widths, self.output_height, self.output_width, self.eval_crop_fraction
        )  # int32 scalars, or [B] for a padded batch
        batch_size = tf.shape(images)[0]
        boxes = [tf.broadcast_to(value, [batch_size]) for value in boxes]
        images = crop_and_resize(images, *boxes, (self.output_height, self.output_width))
        return tf.clip_by_value(images, 0.0, 1.0)

    def _crop_aspect_ratio_range(self):
        if self.crop_sampler == "tensorflow":
            output_ratio = self.output_width / self.output_height
            return tuple(bound * output_ratio for bound in self.aspect_ratio_range)
        return self.aspect_ratio_range

    def _training_view(self, images, seed, image_heights, image_widths):
        shape = tf.shape(images)
        batch_size = shape[0]
        (
            crop_seed,
            flip_seed,
            jitter_seed,
            jitter_apply_seed,
            grayscale_seed,
            blur_seed,
            blur_apply_seed,
        ) = _split_seed(seed, 7)

        # 1. Random resized crop, 2. horizontal flip. A flip reverses the output columns,
        # so it is folded into the column matrix [B, out_w, W] at no extra cost.
        tops, lefts, heights, widths = sample_crop_boxes(
            crop_seed,
            batch_size,
            image_heights,
            image_widths,
            self.crop_area_range,
            self._crop_aspect_ratio_range(),
            self.crop_sampler,
        )
        row_weights = cubic_resize_weights(tops, heights, shape[1], self.output_height)
        column_weights = cubic_resize_weights(lefts, widths, shape[2], self.output_width)
        flips = _bernoulli(flip_seed, batch_size, self.flip_probability)
        column_weights = tf.where(
            flips[:, None, None], tf.reverse(column_weights, axis=[1]), column_weights
        )
        images = separable_resample(images, row_weights, column_weights)

        # 3. Colour distortion. Bicubic overshoot outside [0, 1] is left as in the official
        # code, where only the jitter's per-op clipping and the final clip remove it.
        if self.color_jitter_probability > 0.0 and self.color_jitter_strength > 0.0:
            parameters = sample_color_jitter_parameters(
                jitter_seed, batch_size, self.color_jitter_strength
            )
            jittered = color_jitter(images, parameters)
            apply = _bernoulli(jitter_apply_seed, batch_size, self.color_jitter_probability)
            images = _select(apply[:, None, None, None], jittered, images)

        # 4. Grayscale.
        if self.grayscale_probability > 0.0:
            gray = _bernoulli(grayscale_seed, batch_size, self.grayscale_probability)
            images = _select(gray[:, None, None, None], to_grayscale(images), images)

        # 5. Gaussian blur; images left unblurred get identity matrices.
        if self.use_blur and self.blur_probability > 0.0:
            sigma_count = batch_size if self.blur_sigma_per == "image" else 1
            sigmas = stateless_uniform(blur_seed, [sigma_count], *self.blur_sigma_range)
            sigmas = tf.broadcast_to(sigmas, [batch_size])
            blur = _bernoulli(blur_apply_seed, batch_size, self.blur_probability)[:, None, None]
            row_weights = gaussian_blur_weights(
                sigmas, self.output_height, self.blur_radius, self.blur_padding
            )
            column_weights = gaussian_blur_weights(
                sigmas, self.output_width, self.blur_radius, self.blur_padding
            )
            row_weights = tf.where(blur, row_weights, tf.eye(self.output_height)[None])
            column_weights = tf.where(blur, column_weights, tf.eye(self.output_width)[None])
            images = separable_resample(images, row_weights, column_weights)

        return tf.clip_by_value(images, 0.0, 1.0)

    def _training_view_function(self, images):
        """`_training_view`, or the same compiled with XLA where `jit_compile` asks for it.

        "auto" compiles only inside a `tf.function` and for a static image size: XLA compiles
        once per input shape, so a per-image `tf.data` map over images of many sizes would
        compile for each. The compiled function is keyed by the layer's settings, which it
        bakes in when traced, so changing an attribute later takes effect.
        """
        static_size = images.shape[1:3].is_fully_defined()
        if self.jit_compile is False or (self.jit_compile == "auto" and (tf.executing_eagerly() or not static_size)):
            return self._training_view
        settings = repr(self.get_config())
        compiled = self._compiled_training_views
        if settings not in compiled:
            # Traced once per input signature; the seed generator stays outside, in the caller's graph.
            compiled.clear()
            compiled[settings] = tf.function(self._training_view, jit_compile=True)
        return compiled[settings]

    def call(self, images, training=True, seed=None):
        """Augments a batch [B, H, W, 3] (or one image [H, W, 3]).

        Args:
            images: integer images in [0, 255] or float images in `value_range`; or a padded
                batch {"images": [B, H, W, 3], "image_shapes": int [B, 2]} of images of
                different sizes.
            training: random views if True, the deterministic centre crop if False.
            seed: optional integer tensor of shape [2]; makes the call stateless.

        Returns:
            float32 [B, out_h, out_w, 3] (or [out_h, out_w, 3]) in [0, 1].
        """
        image_shapes = None
        if isinstance(images, dict):
            image_shapes = tf.cast(images[IMAGE_SHAPES], tf.int32)  # [B, 2]
            images = images[PADDED_IMAGES]
        images = tf.convert_to_tensor(images)
        if images.shape.rank not in (3, 4):
            raise ValueError(f"Expected images of rank 3 or 4, got shape {images.shape}.")
        single_image = images.shape.rank == 3
        if single_image:
            images = images[None]
        images = self._to_unit_range(images)
        if image_shapes is None:
            shape = tf.shape(images)
            image_heights, image_widths = shape[1], shape[2]
        else:
            image_heights, image_widths = image_shapes[:, 0], image_shapes[:, 1]

        def training_view():
            view_seed = seed if seed is not None else _distinct_per_replica(self.seed_generator.next())
            training_view_function = self._training_view_function(images)
            return training_view_function(images, _as_seed(view_seed), image_heights, image_widths)

        def evaluation_view():
            return self._evaluation_view(images, image_heights, image_widths)

        if training is None or isinstance(training, (bool, np.bool_)):
            training = True if training is None else bool(training)
            outputs = training_view() if training else evaluation_view()
        else:
            outputs = tf.cond(tf.cast(training, tf.bool), training_view, evaluation_view)
        return outputs[0] if single_image else outputs

    def compute_output_shape(self, input_shape):
        if isinstance(input_shape, dict):
            input_shape = input_shape[PADDED_IMAGES]
        if len(input_shape) == 3:
            return (self.output_height, self.output_width, 3)
        return (input_shape[0], self.output_height, self.output_width, 3)

    def compute_output_spec(self, images, training=True, seed=None):
        if isinstance(images, dict):
            images = images[PADDED_IMAGES]
        return keras.KerasTensor(self.compute_output_shape(images.shape), dtype="float32")

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "image_size": self.image_size,
                "crop_area_range": self.crop_area_range,
                "aspect_ratio_range": self.aspect_ratio_range,
                "flip_probability": self.flip_probability,
                "color_jitter_strength": self.color_jitter_strength,
                "color_jitter_probability": self.color_jitter_probability,
                "grayscale_probability": self.grayscale_probability,
                "use_blur": self.use_blur,
                "blur_probability": self.blur_probability,
                "blur_sigma_range": self.blur_sigma_range,
                "value_range": self.value_range,
                "eval_crop_fraction": self.eval_crop_fraction,
                "seed": self.seed,
                "blur_padding": self.blur_padding,
                "crop_sampler": self.crop_sampler,
                "jit_compile": self.jit_compile,
                "blur_sigma_per": self.blur_sigma_per,
            }
        )
        return config
