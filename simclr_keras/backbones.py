"""ResNet v1 encoders f(.) for SimCLR.

SimCLR (Chen et al., "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020, arXiv:2002.05709) uses a standard ResNet (He et
al., "Deep Residual Learning for Image Recognition", arXiv:1512.03385) as the
base encoder and takes the representation h = f(x) after global average
pooling.  This module follows the layer choices of the official
google-research/simclr (tf2) `resnet.py`:

* convolutions without bias; strided convolutions pad the input explicitly and
  symmetrically (pad_begin = (k - 1) // 2) and then run with "valid" padding,
  unlike TensorFlow's asymmetric "same" padding;
* batch normalisation with momentum (decay) 0.9 and epsilon 1e-5;
* kernels initialised with `VarianceScaling()` (scale 1, fan-in, truncated
  normal), the Keras default used by the official code;
* the stride of a bottleneck block sits in its 3x3 convolution (ResNet v1.5,
  also used by torchvision);
* a "cifar" stem (3x3 conv, stride 1, no max-pool) for images of at most
  32x32 pixels (paper, Appendix B.9) and the usual 7x7/2 conv + 3x3/2 max-pool
  "imagenet" stem otherwise;
* inputs are float images in [0, 1] without mean/std normalisation.

Two deliberate differences from the official code, both matching torchvision:
a projection shortcut is only used when the block changes the tensor shape
(the official code also projects in the first block of group 1 of ResNet-18/34,
where the shape is unchanged), and the last batch-norm gamma of each residual
branch is initialised to one unless `zero_initialize_residual_gamma=True` (the
official code initialises it to zero).
"""

import keras

from simclr_keras.batch_norm import FusedBatchNormalization
from simclr_keras.conv import MatmulGradientConv2D

BATCH_NORM_MOMENTUM = 0.9
BATCH_NORM_EPSILON = 1e-5

# depth -> (block kind, number of blocks in each of the four groups)
_RESNET_SPECIFICATIONS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
}
_GROUP_BASE_FILTERS = (64, 128, 256, 512)
_GROUP_STRIDES = (1, 2, 2, 2)
_BOTTLENECK_EXPANSION = 4
_STEMS = ("auto", "cifar", "imagenet")


def _check_depth(depth):
    if depth not in _RESNET_SPECIFICATIONS:
        raise ValueError(
            f"Unsupported ResNet depth: depth={depth!r}. Expected one of "
            f"{sorted(_RESNET_SPECIFICATIONS)}."
        )


def _check_width_multiplier(width_multiplier):
    if (
        isinstance(width_multiplier, bool)
        or not isinstance(width_multiplier, (int, float))
        or not width_multiplier > 0
    ):
        raise ValueError(
            "width_multiplier must be a positive number (1, 2, 4 as in the paper; 0.25 or 0.5 for "
            f"quick CPU runs), received width_multiplier={width_multiplier!r}."
        )


def _scaled_filters(base_filters, width_multiplier):
    return max(1, int(round(base_filters * width_multiplier)))


def backbone_output_dim(depth, width_multiplier=1):
    """Width of the representation h of `resnet(depth, width_multiplier)`.

    512 * width_multiplier for the basic-block ResNets (18, 34) and
    2048 * width_multiplier for the bottleneck ResNet-50, as in SimCLR's
    Table 1 / Figure 7 (arXiv:2002.05709).
    """
    _check_depth(depth)
    _check_width_multiplier(width_multiplier)
    block_kind, _ = _RESNET_SPECIFICATIONS[depth]
    expansion = _BOTTLENECK_EXPANSION if block_kind == "bottleneck" else 1
    return _scaled_filters(_GROUP_BASE_FILTERS[-1], width_multiplier) * expansion


def resolve_stem(stem, image_size):
    """Return "cifar" or "imagenet" for a `stem` argument of `resnet`.

    "auto" follows the official SimCLR rule `cifar_stem = image_size <= 32`.
    """
    if stem not in _STEMS:
        raise ValueError(
            f"Unknown stem: stem={stem!r}. Expected one of {list(_STEMS)}."
        )
    if stem != "auto":
        return stem
    return "cifar" if image_size <= 32 else "imagenet"


class _LayerFactory:
    """Creates the conv / batch-norm layers with the shared settings."""

    def __init__(self, synchronized_batch_norm, zero_initialize_residual_gamma):
        self.synchronized_batch_norm = synchronized_batch_norm
        self.zero_initialize_residual_gamma = zero_initialize_residual_gamma

    def conv(self, inputs, filters, kernel_size, strides, name):
        if strides > 1:
            # Symmetric explicit padding so that the output only depends on the
            # input size, as the official Conv2dFixedPadding.
            pad_total = kernel_size - 1
            pad_begin = pad_total // 2
            pad_end = pad_total - pad_begin
            if pad_total > 0:
                inputs = keras.layers.ZeroPadding2D(
                    padding=((pad_begin, pad_end), (pad_begin, pad_end)),
                    name=f"{name}_pad",
                )(inputs)
            padding = "valid"
        else:
            padding = "same"
        return MatmulGradientConv2D(
            filters,
            kernel_size,
            strides=strides,
            padding=padding,
            use_bias=False,
            kernel_initializer=keras.initializers.VarianceScaling(
                scale=1.0, mode="fan_in", distribution="truncated_normal"
            ),
            name=name,
        )(inputs)

    def batch_norm(self, inputs, name, relu=True, closes_residual_branch=False):
        zero_gamma = closes_residual_branch and self.zero_initialize_residual_gamma
        outputs = FusedBatchNormalization(
            momentum=BATCH_NORM_MOMENTUM,
            epsilon=BATCH_NORM_EPSILON,
            gamma_initializer="zeros" if zero_gamma else "ones",
            synchronized=self.synchronized_batch_norm,
            name=name,
        )(inputs)
        if relu:
            outputs = keras.layers.ReLU(name=f"{name}_relu")(outputs)
        return outputs


def _shortcut(layers, inputs, output_filters, strides, name):
    if strides == 1 and inputs.shape[-1] == output_filters:
        return inputs
    shortcut = layers.conv(inputs, output_filters, 1, strides, f"{name}_shortcut_conv")
    return layers.batch_norm(shortcut, f"{name}_shortcut_bn", relu=False)


def _basic_block(layers, inputs, filters, strides, name):
    shortcut = _shortcut(layers, inputs, filters, strides, name)
    outputs = layers.conv(inputs, filters, 3, strides, f"{name}_conv1")
    outputs = layers.batch_norm(outputs, f"{name}_bn1")
    outputs = layers.conv(outputs, filters, 3, 1, f"{name}_conv2")
    outputs = layers.batch_norm(
        outputs, f"{name}_bn2", relu=False, closes_residual_branch=True
    )
    outputs = keras.layers.Add(name=f"{name}_add")([outputs, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(outputs)


def _bottleneck_block(layers, inputs, filters, strides, name):
    output_filters = filters * _BOTTLENECK_EXPANSION
    shortcut = _shortcut(layers, inputs, output_filters, strides, name)
    outputs = layers.conv(inputs, filters, 1, 1, f"{name}_conv1")
    outputs = layers.batch_norm(outputs, f"{name}_bn1")
    outputs = layers.conv(outputs, filters, 3, strides, f"{name}_conv2")
    outputs = layers.batch_norm(outputs, f"{name}_bn2")
    outputs = layers.conv(outputs, output_filters, 1, 1, f"{name}_conv3")
    outputs = layers.batch_norm(
        outputs, f"{name}_bn3", relu=False, closes_residual_branch=True
    )
    outputs = keras.layers.Add(name=f"{name}_add")([outputs, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(outputs)


def resnet(
    depth=18,
    width_multiplier=1,
    image_size=32,
    stem="auto",
    synchronized_batch_norm=False,
    name=None,
    zero_initialize_residual_gamma=False,
):
    """Build the SimCLR base encoder f(.) as a functional `keras.Model`.

    The model maps float images [B, H, W, 3] with values in [0, 1] to the
    representation h = f(x) of shape [B, backbone_output_dim(depth,
    width_multiplier)], taken after global average pooling (Chen et al.,
    arXiv:2002.05709, Section 2.1).  H and W are left dynamic so the same
    model accepts any image size; `image_size` only selects the stem.

    Args:
        depth: 18, 34 (basic blocks) or 50 (bottleneck blocks).
        width_multiplier: positive number multiplying every channel count (rounded)
            (SimCLR's ResNet-50 (2x), (4x)).
        image_size: training image side length, used by `stem="auto"`.
        stem: "cifar" (3x3 conv stride 1, no max-pool), "imagenet" (7x7 conv
            stride 2 and 3x3 max-pool stride 2) or "auto" (cifar when
            image_size <= 32, as the official code).
        synchronized_batch_norm: use cross-replica ("global") batch norm, as
            the paper does for large-batch training (Section 2.2).
        name: model name; defaults to e.g. "resnet50" or "resnet50_x2".
        zero_initialize_residual_gamma: initialise the gamma of the last batch
            norm of every residual branch to zero (the official code does;
            off by default here).

    Layers follow the global dtype policy; h is always returned as float32 so
    that the contrastive loss is computed in full precision under mixed
    precision.
    """
    _check_depth(depth)
    _check_width_multiplier(width_multiplier)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(
            "image_size must be a positive integer, received "
            f"image_size={image_size!r}."
        )
    stem = resolve_stem(stem, image_size)
    # The CIFAR stem keeps the size and groups 2-4 halve it (8x in all); the ImageNet stem adds a
    # strided conv and a strided max-pool (32x). Smaller images leave the last group under one pixel.
    downsampling = 8 if stem == "cifar" else 32
    if image_size < downsampling:
        raise ValueError(
            f"image_size must be >= {downsampling} for the {stem} stem, which downsamples by {downsampling}; "
            f"received image_size={image_size!r}."
        )
    block_kind, blocks_per_group = _RESNET_SPECIFICATIONS[depth]
    block_function = _basic_block if block_kind == "basic" else _bottleneck_block
    layers = _LayerFactory(
        synchronized_batch_norm=bool(synchronized_batch_norm),
        zero_initialize_residual_gamma=bool(zero_initialize_residual_gamma),
    )
    if name is None:
        name = f"resnet{depth}" + (f"_x{width_multiplier:g}" if width_multiplier != 1 else "")

    images = keras.Input(shape=(None, None, 3), name="images")
    stem_filters = _scaled_filters(_GROUP_BASE_FILTERS[0], width_multiplier)
    if stem == "cifar":
        features = layers.conv(images, stem_filters, 3, 1, "stem_conv")
        features = layers.batch_norm(features, "stem_bn")
    else:
        features = layers.conv(images, stem_filters, 7, 2, "stem_conv")
        features = layers.batch_norm(features, "stem_bn")
        # "same" max-pool equals torchvision's padding=1 here because the
        # input is post-ReLU (non-negative), so zero padding never wins.
        features = keras.layers.MaxPooling2D(
            pool_size=3, strides=2, padding="same", name="stem_pool"
        )(features)

    for group_index, (base_filters, group_stride, num_blocks) in enumerate(
        zip(_GROUP_BASE_FILTERS, _GROUP_STRIDES, blocks_per_group), start=1
    ):
        for block_index in range(1, num_blocks + 1):
            features = block_function(
                layers,
                features,
                filters=_scaled_filters(base_filters, width_multiplier),
                strides=group_stride if block_index == 1 else 1,
                name=f"group{group_index}_block{block_index}",
            )

    # [B, H/s, W/s, C] -> [B, C]
    representation = keras.layers.GlobalAveragePooling2D(name="average_pool")(features)
    representation = keras.layers.Activation(
        "linear", dtype="float32", name="representation"
    )(representation)
    return keras.Model(images, representation, name=name)
