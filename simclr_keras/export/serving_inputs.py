"""What a served request goes through before the encoder: bounds, the channel rule, the evaluation view.

TensorFlow Serving hands a signature whatever its clients sent, so everything here runs in the
SavedModel's graph and checks a request before doing work proportional to it:

- at most `max_batch_size` images a request, each side 1 to `max_image_side` pixels (both fixed at
  export time); otherwise an InvalidArgument error naming the bound and the size received;
- the channel rule of the training pipeline (`tf.io.decode_image(..., channels=3)`): 1 channel
  (grayscale) is replicated to RGB, 2 (grayscale and alpha) keep the grayscale replicated, 4 (RGBA)
  drop alpha; any other count is refused;
- the evaluation view of `SimCLRAugmentation(training=False)` (centre crop, bicubic resize, [0, 1]),
  computed from the uint8 crop a strip of rows at a time, so that no float copy of the image is made:
  the work memory beyond the request is a few MB whatever the image size;
- encoded images (`serving_bytes`): each header is read before decoding, so an image beyond the
  bound is refused without being decoded, and an item that is no JPEG, PNG, GIF or BMP, or does not
  decode, is refused by its index.
"""

import tensorflow as tf

from simclr_keras import augment

DEFAULT_MAX_IMAGE_SIDE = 4096
DEFAULT_MAX_BATCH_SIZE = 1024
# Floats converted at once (16 MB): a strip of rows of the crop across the batch. CIFAR batches of 500
# fit in one strip; a 4096 x 4096 RGB crop takes 12 strips of 341 rows.
STRIP_FLOATS = 1 << 22
# The channel counts of the rule above, and what the error says.
CHANNEL_RULE = "3 (RGB), 1 (grayscale), 2 (grayscale and alpha) or 4 (RGBA; alpha is dropped)"
ENCODED_FORMATS = "JPEG, PNG, GIF or BMP"


def _as_text(part):
    return part if isinstance(part, str) or part.dtype == tf.string else tf.strings.as_string(part)


def refusal(condition, *parts):
    """An assertion op: InvalidArgument "assertion failed: [<message>]" unless `condition`.

    The message joins `parts`: strings or string tensors, and int tensors written as numbers.
    """
    message = tf.strings.join([_as_text(part) for part in parts])
    return tf.debugging.Assert(condition, [message], summarize=1)


def image_checks(shape, max_image_side, name):
    """Assertions on one image shape [height, width, channels] (int tensor), named `name` in errors."""
    height, width, channels = shape[0], shape[1], shape[2]
    sides_in_range = (tf.minimum(height, width) >= 1) & (tf.maximum(height, width) <= max_image_side)
    return [
        refusal(
            sides_in_range, name, ": ", height, "x", width, " pixels (height x width); this export takes sides "
            f"of 1 to {max_image_side} pixels (its max_image_side)",
        ),
        refusal((channels >= 1) & (channels <= 4), name, ": ", channels, " channels; this export takes ", CHANNEL_RULE),
    ]  # fmt: skip


def batch_check(batch_size, max_batch_size, name):
    return refusal(
        batch_size <= max_batch_size, name, ": a batch of ", batch_size,
        f" images; this export takes 0 to {max_batch_size} images a request (its max_batch_size)",
    )  # fmt: skip


def checked_images(images, max_image_side, max_batch_size):
    """`images` (uint8 [B, H, W, C]) once it is within the bounds; a batch of 0 images always is."""
    shape = tf.shape(images)
    checks = [batch_check(shape[0], max_batch_size, "images")]
    empty_batch = tf.equal(shape[0], 0)
    image_shape = tf.where(empty_batch, tf.constant([1, 1, 3]), shape[1:])
    checks += image_checks(image_shape, max_image_side, "images")
    with tf.control_dependencies(checks):  # nothing below starts before the checks pass
        return tf.identity(images)


def _resampled_rows(images, top, left, crop_height, crop_width, row_weights):
    """Row weights [S, crop_height] applied to the crop of uint8 images [B, H, W, C]: float32 [B, S, crop_width, C].

    The crop is cast to float a strip of rows at a time, so the float memory is about
    max(STRIP_FLOATS, one row of the batch), never the image's.
    """
    shape = tf.shape(images)
    row_floats = tf.cast(shape[0], tf.int64) * tf.cast(crop_width * shape[3], tf.int64)  # int32 could overflow
    strip_rows = tf.cast(tf.maximum(tf.constant(1, tf.int64), STRIP_FLOATS // row_floats), tf.int32)

    def add_strip(start, total):
        end = tf.minimum(start + strip_rows, crop_height)
        strip = tf.cast(images[:, top + start : top + end, left : left + crop_width], tf.float32)
        return end, total + tf.einsum("oh,bhwc->bowc", row_weights[:, start:end], strip)

    total = tf.zeros([shape[0], tf.shape(row_weights)[0], crop_width, shape[3]])  # (B, S, crop_width, C)
    _, total = tf.while_loop(
        lambda start, _: start < crop_height, add_strip, (tf.constant(0), total), parallel_iterations=1
    )
    return total


def rgb(images):
    """The channel rule: [B, H, W, C] with C in 1-4 -> [B, H, W, 3] (grayscale replicated, alpha dropped)."""
    channels = tf.shape(images)[3]
    kept = tf.where(channels >= 3, 3, 1)
    return tf.tile(images[..., :kept], [1, 1, 1, 3 // kept])


def evaluation_views(images, augmenter):
    """`augmenter(images, training=False)` for checked uint8 images [B, H, W, C], B >= 1: float32 [B, S, S, 3].

    The same centre crop and bicubic weights (`augment.center_crop_box`, `cubic_resize_weights`), but
    applied to the uint8 crop, rows first (in strips), then columns, with the scale to [0, 1] last.
    """
    output_height, output_width = augmenter.output_height, augmenter.output_width
    shape = tf.shape(images)
    top, left, crop_height, crop_width = augment.center_crop_box(
        shape[1], shape[2], output_height, output_width, augmenter.eval_crop_fraction
    )
    # A window that is the whole (cropped) axis: (S, crop side), as crop_and_resize would weigh the crop.
    row_weights = augment.cubic_resize_weights([0], [crop_height], crop_height, output_height)[0]
    column_weights = augment.cubic_resize_weights([0], [crop_width], crop_width, output_width)[0]
    rows = _resampled_rows(images, top, left, crop_height, crop_width, row_weights)  # (B, S, crop_width, C)
    views = tf.einsum("pw,bowc->bopc", column_weights, rows) / 255.0  # (B, S, S, C)
    return tf.clip_by_value(rgb(views), 0.0, 1.0)


def views_or_placeholder(batch_size, make_views, augmenter):
    """make_views() (float32 [B, S, S, 3]) if batch_size > 0, else one blank view [1, S, S, 3].

    The encoder runs on the blank view and the caller keeps the first B = 0 outputs, so that an empty
    request gets [0, D] outputs whatever the encoder (which may not accept an empty batch).
    """
    placeholder = tf.zeros([1, augmenter.output_height, augmenter.output_width, 3])
    return tf.cond(batch_size > 0, make_views, lambda: placeholder)


def _header_pair(encoded, offset, dtype, little_endian):
    """Two integers of `dtype` at byte `offset` of an encoded image, as int32 [2]."""
    raw = tf.strings.substr(encoded, offset, 2 * dtype.size)
    return tf.cast(tf.io.decode_raw(raw, dtype, little_endian=little_endian), tf.int32)[:2]


def encoded_image_size(encoded):
    """(height, width) of an encoded JPEG, PNG, GIF or BMP image, int32 [2], read from its header only.

    An error (no such format, a header too short) is for the caller's `ignore_errors`. A GIF's size is
    its logical screen, which is the size TensorFlow's decoder returns.
    """

    def starts_with(magic):
        return tf.equal(tf.strings.substr(encoded, 0, len(magic)), magic)

    def unknown():
        with tf.control_dependencies([refusal(False, "not a ", ENCODED_FORMATS, " image")]):
            return tf.zeros([2], tf.int32)

    return tf.case(
        [
            (starts_with(b"\xff\xd8\xff"), lambda: tf.io.extract_jpeg_shape(encoded)[:2]),
            # PNG: IHDR's width and height, big-endian, at byte 16.
            (starts_with(b"\x89PNG\r\n\x1a\n"), lambda: tf.reverse(_header_pair(encoded, 16, tf.int32, False), [0])),
            # GIF: the logical screen's width and height, little-endian uint16, at byte 6.
            (starts_with(b"GIF87a") | starts_with(b"GIF89a"),
             lambda: tf.reverse(_header_pair(encoded, 6, tf.uint16, True), [0])),
            # BMP: width and height at byte 18; a negative height is a top-down image.
            (starts_with(b"BM"), lambda: tf.abs(tf.reverse(_header_pair(encoded, 18, tf.int32, True), [0]))),
        ],
        default=unknown,
    )  # fmt: skip


def _decode_within_bounds(index, encoded, max_image_side):
    """(index, header size [2], uint8 image [h, w, 3]); the image is decoded only if the header's
    size is within the bound ([0, 0, 3] otherwise, for `_checked_view` to refuse)."""
    size = encoded_image_size(encoded)
    within = (tf.reduce_min(size) >= 1) & (tf.reduce_max(size) <= max_image_side)
    image = tf.cond(
        within,
        lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False),  # training's decode
        lambda: tf.zeros([0, 0, 3], tf.uint8),
    )
    return index, size, image


def _checked_view(index, size, image, augmenter, max_image_side):
    """(index, evaluation view [S, S, 3]) of a decoded image, once its header and pixels are within the bound."""
    name = tf.strings.join(["image_bytes[", tf.strings.as_string(index), "]"])
    with tf.control_dependencies(image_checks(tf.concat([size, [3]], 0), max_image_side, name)):
        decoded_checks = image_checks(tf.shape(image), max_image_side, name)
    with tf.control_dependencies(decoded_checks):
        return index, evaluation_views(tf.identity(image)[None], augmenter)[0]


def _first_missing(indices, count):
    """The smallest of 0..count-1 not in `indices` (ascending int32), or `count` if none is missing."""
    expected = tf.range(count)
    padded = tf.concat([indices, tf.fill([count - tf.size(indices)], -1)], 0)  # (count,)
    return tf.reduce_min(tf.concat([tf.boolean_mask(expected, padded != expected), [count]], 0))


def decoded_views(image_bytes, augmenter, max_image_side, max_batch_size):
    """The evaluation views of a batch of encoded images (string [B]): float32 [B, S, S, 3].

    Decoding runs in a tf.data pass whose `ignore_errors` drops the items that fail; each carries its
    index, so the first index missing from the result is the one the error names.
    """
    count = tf.size(image_bytes)
    with tf.control_dependencies([batch_check(count, max_batch_size, "image_bytes")]):
        image_bytes = tf.identity(image_bytes)
    items = tf.data.Dataset.from_tensor_slices((tf.range(count), image_bytes))
    decoded = items.map(lambda index, encoded: _decode_within_bounds(index, encoded, max_image_side)).ignore_errors()
    views = decoded.map(lambda index, size, image: _checked_view(index, size, image, augmenter, max_image_side))
    # A last placeholder element makes the one batch exist even when nothing decodes.
    placeholder = tf.data.Dataset.from_tensors((-1, tf.zeros([augmenter.output_height, augmenter.output_width, 3])))
    indices, views = views.concatenate(placeholder).batch(tf.cast(count, tf.int64) + 1).get_single_element()
    missing = _first_missing(indices[:-1], count)
    missing_length = tf.reduce_sum(tf.where(tf.range(count) == missing, tf.strings.length(image_bytes), 0))
    undecodable = refusal(
        tf.equal(missing, count), "image_bytes[", missing, "]: ", missing_length,
        " bytes that do not decode as a " + ENCODED_FORMATS + " image; send one encoded image per item",
    )  # fmt: skip
    with tf.control_dependencies([undecodable]):
        return tf.identity(views[:-1])
