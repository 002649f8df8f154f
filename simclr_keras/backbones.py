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

* the gamma of the last batch norm of every residual branch starts at zero
  (`zero_init_residual=True`, the official `init_zero=True`), so that every
  residual block starts as the identity (Goyal et al., arXiv:1706.02677);
* optionally SimCLR v2's selective kernels (`selective_kernel_ratio`, the
  official `sk_ratio`; Li et al., arXiv:1903.06586) with the ResNet-D stem and
  shortcuts that come with them (He et al., arXiv:1812.01187).

One deliberate difference from the official code, matching torchvision: a
projection shortcut is only used when the block changes the tensor shape (the
official code also projects in the first block of group 1 of ResNet-18/34,
where the shape is unchanged).  The bottleneck ResNets (50, 101, 152), the
official SimCLR checkpoints among them, have the official layout exactly.
"""

import keras

from simclr_keras.batch_norm import FusedBatchNormalization
from simclr_keras.conv import MatmulGradientConv2D
from simclr_keras.selective_kernel import SelectiveKernelConv2D

BATCH_NORM_MOMENTUM = 0.9
BATCH_NORM_EPSILON = 1e-5

# depth -> (block kind, number of blocks in each of the four groups)
_RESNET_SPECIFICATIONS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
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

    def __init__(self, synchronized_batch_norm, zero_init_residual, selective_kernel_ratio):
        self.synchronized_batch_norm = synchronized_batch_norm
        self.zero_init_residual = zero_init_residual
        self.selective_kernel_ratio = selective_kernel_ratio

    def conv(self, inputs, filters, kernel_size, strides, name):
        if strides > 1:
            # Symmetric explicit padding so that the output only depends on the
            # input size, as the official Conv2dFixedPadding.
            inputs = _fixed_padding(inputs, kernel_size, f"{name}_pad")
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
        zero_gamma = closes_residual_branch and self.zero_init_residual
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

    def selective_kernel_conv(self, inputs, filters, strides, name):
        return SelectiveKernelConv2D(
            filters,
            strides=strides,
            ratio=self.selective_kernel_ratio,
            synchronized_batch_norm=self.synchronized_batch_norm,
            name=name,
        )(inputs)


def _fixed_padding(inputs, kernel_size, name):
    """Pads (k - 1) // 2 before and the rest after, as the official FixedPadding."""
    pad_total = kernel_size - 1
    if pad_total == 0:
        return inputs
    pad_begin = pad_total // 2
    pad_end = pad_total - pad_begin
    return keras.layers.ZeroPadding2D(padding=((pad_begin, pad_end), (pad_begin, pad_end)), name=name)(inputs)


def _shortcut(layers, inputs, output_filters, strides, name):
    if strides == 1 and inputs.shape[-1] == output_filters:
        return inputs
    if layers.selective_kernel_ratio > 0:
        # ResNet-D: average-pool first, so that the 1x1 projection sees every pixel.
        if strides > 1:
            inputs = _fixed_padding(inputs, 2, f"{name}_shortcut_pad")
        inputs = keras.layers.AveragePooling2D(
            pool_size=2, strides=strides, padding="same" if strides == 1 else "valid", name=f"{name}_shortcut_pool"
        )(inputs)
        strides = 1
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
    if layers.selective_kernel_ratio > 0:
        # Its own batch norm and ReLU are inside, after the two-stream 3x3 convolution.
        outputs = layers.selective_kernel_conv(outputs, filters, strides, f"{name}_conv2")
    else:
        outputs = layers.conv(outputs, filters, 3, strides, f"{name}_conv2")
        outputs = layers.batch_norm(outputs, f"{name}_bn2")
    outputs = layers.conv(outputs, output_filters, 1, 1, f"{name}_conv3")
    outputs = layers.batch_norm(
        outputs, f"{name}_bn3", relu=False, closes_residual_branch=True
    )
    outputs = keras.layers.Add(name=f"{name}_add")([outputs, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(outputs)


def _imagenet_stem(layers, images, width_multiplier):
    """7x7/2 conv (or, with selective kernels, three 3x3 convs: ResNet-D), batch norm, 3x3/2 max-pool."""
    stem_filters = _scaled_filters(_GROUP_BASE_FILTERS[0], width_multiplier)
    if layers.selective_kernel_ratio > 0:
        half_filters = _scaled_filters(_GROUP_BASE_FILTERS[0] // 2, width_multiplier)
        features = layers.conv(images, half_filters, 3, 2, "stem_conv1")
        features = layers.batch_norm(features, "stem_bn1")
        features = layers.conv(features, half_filters, 3, 1, "stem_conv2")
        features = layers.batch_norm(features, "stem_bn2")
        features = layers.conv(features, stem_filters, 3, 1, "stem_conv")
    else:
        features = layers.conv(images, stem_filters, 7, 2, "stem_conv")
    features = layers.batch_norm(features, "stem_bn")
    # "same" max-pool equals torchvision's padding=1 here because the
    # input is post-ReLU (non-negative), so zero padding never wins.
    return keras.layers.MaxPooling2D(pool_size=3, strides=2, padding="same", name="stem_pool")(features)


def _check_image_size(image_size, stem):
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(
            "image_size must be a positive integer, received "
            f"image_size={image_size!r}."
        )
    # The CIFAR stem keeps the size and groups 2-4 halve it (8x in all); the ImageNet stem adds a
    # strided conv and a strided max-pool (32x). Smaller images leave the last group under one pixel.
    downsampling = 8 if stem == "cifar" else 32
    if image_size < downsampling:
        raise ValueError(
            f"image_size must be >= {downsampling} for the {stem} stem, which downsamples by {downsampling}; "
            f"received image_size={image_size!r}."
        )


def _check_selective_kernel_ratio(ratio, block_kind):
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ValueError(
            "selective_kernel_ratio must be a number in [0, 1) (0: plain 3x3 convolutions; 0.0625: SimCLR v2's "
            f"*_sk1 models), received selective_kernel_ratio={ratio!r}."
        )
    if ratio > 0 and block_kind != "bottleneck":
        raise ValueError(
            "selective kernels replace the 3x3 convolution of bottleneck blocks (depth 50, 101 or 152); "
            f"received selective_kernel_ratio={ratio!r} with a basic-block ResNet."
        )


def resnet(
    depth=18,
    width_multiplier=1,
    image_size=32,
    stem="auto",
    synchronized_batch_norm=False,
    name=None,
    zero_init_residual=True,
    selective_kernel_ratio=0.0,
):
    """Build the SimCLR base encoder f(.) as a functional `keras.Model`.

    The model maps float images [B, H, W, 3] with values in [0, 1] to the
    representation h = f(x) of shape [B, backbone_output_dim(depth,
    width_multiplier)], taken after global average pooling (Chen et al.,
    arXiv:2002.05709, Section 2.1).  H and W are left dynamic so the same
    model accepts any image size; `image_size` only selects the stem.

    Args:
        depth: 18, 34 (basic blocks), 50, 101 or 152 (bottleneck blocks).
        width_multiplier: positive number multiplying every channel count (rounded)
            (SimCLR's ResNet-50 (2x), (4x)).
        image_size: training image side length, used by `stem="auto"`.
        stem: "cifar" (3x3 conv stride 1, no max-pool), "imagenet" (7x7 conv
            stride 2 and 3x3 max-pool stride 2) or "auto" (cifar when
            image_size <= 32, as the official code).
        synchronized_batch_norm: use cross-replica ("global") batch norm, as
            the paper does for large-batch training (Section 2.2).
        name: model name; defaults to e.g. "resnet50" or "resnet50_x2".
        zero_init_residual: bool; start the gamma of the last batch norm of every
            residual branch (`*_bn2` of basic blocks, `*_bn3` of bottlenecks) at
            zero, as the official code always does (its `init_zero=True`); False
            starts it at one, as torchvision's default.
        selective_kernel_ratio: float; 0 for plain 3x3 convolutions, > 0 for
            SimCLR v2's selective-kernel bottlenecks (`SelectiveKernelConv2D`,
            the official `sk_ratio`, 0.0625 in its *_sk1 models), which also
            switches to the ResNet-D stem (3x3 convs of 32, 32, 64 channels
            times the width) and average-pooling projection shortcuts.

    Layers follow the global dtype policy; h is always returned as float32 so
    that the contrastive loss is computed in full precision under mixed
    precision.
    """
    _check_depth(depth)
    _check_width_multiplier(width_multiplier)
    block_kind, blocks_per_group = _RESNET_SPECIFICATIONS[depth]
    _check_selective_kernel_ratio(selective_kernel_ratio, block_kind)
    stem = resolve_stem(stem, image_size)
    _check_image_size(image_size, stem)
    block_function = _basic_block if block_kind == "basic" else _bottleneck_block
    layers = _LayerFactory(
        synchronized_batch_norm=bool(synchronized_batch_norm),
        zero_init_residual=bool(zero_init_residual),
        selective_kernel_ratio=float(selective_kernel_ratio),
    )
    if name is None:
        name = f"resnet{depth}" + (f"_x{width_multiplier:g}" if width_multiplier != 1 else "")

    images = keras.Input(shape=(None, None, 3), name="images")
    if stem == "cifar":
        features = layers.conv(images, _scaled_filters(_GROUP_BASE_FILTERS[0], width_multiplier), 3, 1, "stem_conv")
        features = layers.batch_norm(features, "stem_bn")
    else:
        features = _imagenet_stem(layers, images, width_multiplier)

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
