"""Tests for simclr_keras.backbones (ResNet v1 encoders of SimCLR, arXiv:2002.05709)."""

import keras
import numpy as np
import pytest

from simclr_keras.backbones import backbone_output_dim, resnet, resolve_stem


def _trainable_parameter_count(model):
    return sum(int(np.prod(variable.shape)) for variable in model.trainable_weights)


def _layers_of_type(model, layer_type):
    return [layer for layer in model.layers if isinstance(layer, layer_type)]


@pytest.fixture(scope="module")
def resnet18_cifar():
    return resnet(depth=18, image_size=32)


@pytest.fixture(scope="module")
def resnet50_imagenet():
    return resnet(depth=50, image_size=224)


def test_resnet18_cifar_parameter_count_matches_hand_count(resnet18_cifar):
    def conv(kernel_size, input_channels, output_channels):
        return kernel_size * kernel_size * input_channels * output_channels

    def batch_norm(channels):  # trainable gamma and beta only
        return 2 * channels

    expected = conv(3, 3, 64) + batch_norm(64)  # 3x3 CIFAR stem
    input_channels = 64
    for channels, num_blocks in zip((64, 128, 256, 512), (2, 2, 2, 2)):
        for block_index in range(num_blocks):
            expected += conv(3, input_channels, channels) + batch_norm(channels)
            expected += conv(3, channels, channels) + batch_norm(channels)
            if block_index == 0 and input_channels != channels:
                expected += conv(1, input_channels, channels) + batch_norm(channels)
            input_channels = channels
    # torchvision resnet18 (11,689,512) minus its fc (513,000) and with the
    # 7x7x3x64 stem replaced by 3x3x3x64 (-7,680).
    assert expected == 11_168_832
    assert _trainable_parameter_count(resnet18_cifar) == expected


def test_resnet50_imagenet_parameter_count_matches_torchvision(resnet50_imagenet):
    # torchvision resnet50: 25,557,032 parameters minus fc (2048 * 1000 + 1000).
    assert _trainable_parameter_count(resnet50_imagenet) == 25_557_032 - 2_049_000


def test_batch_norm_moving_statistics_are_not_trainable(resnet18_cifar):
    non_trainable_names = {variable.name for variable in resnet18_cifar.non_trainable_weights}
    assert non_trainable_names == {"moving_mean", "moving_variance"}


@pytest.mark.parametrize("depth, expected_dim", [(18, 512), (34, 512), (50, 2048)])
def test_output_shape_for_each_depth(depth, expected_dim):
    model = resnet(depth=depth, image_size=16)
    images = np.random.uniform(size=(2, 16, 16, 3)).astype("float32")
    representation = model(images, training=False)
    assert tuple(representation.shape) == (2, expected_dim)
    assert model.output_shape == (None, expected_dim)
    assert backbone_output_dim(depth) == expected_dim


def test_accepts_any_input_size(resnet50_imagenet):
    assert resnet50_imagenet.input_shape == (None, None, None, 3)
    for size in (32, 48):
        images = np.zeros((1, size, size, 3), dtype="float32")
        assert tuple(resnet50_imagenet(images).shape) == (1, 2048)


def _last_feature_map_shape(model, image_size):
    feature_model = keras.Model(model.input, model.get_layer("group4_block2_out").output)
    return tuple(feature_model(np.zeros((1, image_size, image_size, 3), "float32")).shape)


def test_auto_stem_uses_cifar_stem_up_to_32_pixels(resnet18_cifar):
    assert resolve_stem("auto", 32) == "cifar"
    assert not _layers_of_type(resnet18_cifar, keras.layers.MaxPooling2D)
    stem_conv = resnet18_cifar.get_layer("stem_conv")
    assert stem_conv.kernel_size == (3, 3) and stem_conv.strides == (1, 1)
    # Only the three stride-2 groups downsample: 32 -> 4.
    assert _last_feature_map_shape(resnet18_cifar, 32) == (1, 4, 4, 512)


def test_auto_stem_uses_imagenet_stem_above_32_pixels():
    assert resolve_stem("auto", 33) == "imagenet"
    model = resnet(depth=18, image_size=64)
    assert len(_layers_of_type(model, keras.layers.MaxPooling2D)) == 1
    stem_conv = model.get_layer("stem_conv")
    assert stem_conv.kernel_size == (7, 7) and stem_conv.strides == (2, 2)
    # Symmetric explicit padding (3, 3) before the strided 7x7 conv.
    assert model.get_layer("stem_conv_pad").padding == ((3, 3), (3, 3))
    assert _last_feature_map_shape(model, 64) == (1, 2, 2, 512)


def test_explicit_stem_overrides_image_size():
    model = resnet(depth=18, image_size=224, stem="cifar")
    assert model.get_layer("stem_conv").kernel_size == (3, 3)


def test_width_multiplier_doubles_channels():
    model = resnet(depth=18, width_multiplier=2, image_size=32)
    assert model.output_shape == (None, 1024)
    assert model.get_layer("stem_conv").filters == 128
    assert model.get_layer("group4_block2_conv2").filters == 1024
    assert backbone_output_dim(50, 2) == 4096
    assert model.name == "resnet18_x2"


def test_bottleneck_stride_is_in_the_3x3_conv(resnet50_imagenet):
    assert resnet50_imagenet.get_layer("group2_block1_conv1").strides == (1, 1)
    assert resnet50_imagenet.get_layer("group2_block1_conv2").strides == (2, 2)
    assert resnet50_imagenet.get_layer("group2_block1_conv3").filters == 512
    assert resnet50_imagenet.get_layer("group2_block1_shortcut_conv").strides == (2, 2)


def test_projection_shortcut_only_when_shape_changes(resnet18_cifar):
    names = {layer.name for layer in resnet18_cifar.layers}
    assert "group1_block1_shortcut_conv" not in names
    for group in (2, 3, 4):
        assert f"group{group}_block1_shortcut_conv" in names
        assert f"group{group}_block2_shortcut_conv" not in names


def test_layer_settings(resnet18_cifar):
    batch_norms = _layers_of_type(resnet18_cifar, keras.layers.BatchNormalization)
    assert len(batch_norms) == 1 + 2 * 8 + 3
    for layer in batch_norms:
        assert layer.momentum == pytest.approx(0.9)
        assert layer.epsilon == pytest.approx(1e-5)
        assert not layer.synchronized
        # zero_init_residual (default): only the batch norm closing each residual branch starts at 0.
        np.testing.assert_array_equal(layer.gamma.numpy(), 0.0 if layer.name.endswith("_bn2") else 1.0)
    for layer in _layers_of_type(resnet18_cifar, keras.layers.Conv2D):
        assert not layer.use_bias


def test_synchronized_batch_norm_and_zero_gamma_options():
    model = resnet(
        depth=18,
        image_size=16,
        synchronized_batch_norm=True,
        zero_init_residual=False,
    )
    batch_norms = _layers_of_type(model, keras.layers.BatchNormalization)
    assert all(layer.synchronized for layer in batch_norms)
    for layer in batch_norms:  # torchvision's default: every gamma at one
        np.testing.assert_array_equal(layer.gamma.numpy(), 1.0)
    images = np.random.uniform(size=(2, 16, 16, 3)).astype("float32")
    assert tuple(model(images, training=True).shape) == (2, 512)


@pytest.mark.bfloat16
def test_mixed_precision_output_is_float32():
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = resnet(depth=18, image_size=8)
        assert model.get_layer("stem_conv").compute_dtype == "bfloat16"
        assert model.get_layer("stem_conv").kernel.dtype == "float32"
        representation = model(np.zeros((1, 8, 8, 3), "float32"))
        assert representation.dtype == "float32"
    finally:
        keras.config.set_dtype_policy(previous_policy)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"depth": 200}, "depth=200"),
        ({"depth": 18, "width_multiplier": 0}, "width_multiplier=0"),
        ({"depth": 18, "stem": "tiny"}, "stem='tiny'"),
        ({"depth": 18, "image_size": 0}, "image_size=0"),
        ({"depth": 18, "image_size": 4}, "image_size must be >= 8 for the cifar stem.*image_size=4"),
        ({"depth": 18, "image_size": 16, "stem": "imagenet"}, "image_size must be >= 32 for the imagenet stem"),
    ],
)
def test_bad_arguments_raise_value_error(arguments, message):
    with pytest.raises(ValueError, match=message):
        resnet(**arguments)
    if "depth" in arguments and arguments["depth"] == 200:
        with pytest.raises(ValueError, match="depth=200"):
            backbone_output_dim(200)


def _residual_branch_batch_norms(model):
    """The official rule read off the graph: the batch norm whose output enters each block's Add
    through the residual branch, not the shortcut (tf2/resnet.py: BatchNormRelu(init_zero=True))."""
    closing = set()
    for layer in _layers_of_type(model, keras.layers.Add):
        for node in layer._inbound_nodes:
            for tensor in node.input_tensors:
                source = tensor._keras_history.operation
                if isinstance(source, keras.layers.BatchNormalization) and "shortcut" not in source.name:
                    closing.add(source.name)
    return closing


@pytest.mark.parametrize("depth, sk_ratio", [(18, 0.0), (50, 0.0), (50, 0.0625)])
def test_zero_init_residual_follows_the_official_rule(depth, sk_ratio):
    model = resnet(depth=depth, width_multiplier=0.125, image_size=64, selective_kernel_ratio=sk_ratio)
    closing = _residual_branch_batch_norms(model)
    assert len(closing) == sum({18: (2, 2, 2, 2), 50: (3, 4, 6, 3)}[depth])  # one per block
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            np.testing.assert_array_equal(layer.gamma.numpy(), 0.0 if layer.name in closing else 1.0, err_msg=layer.name)
    # So every block starts as ReLU(shortcut): the output of a block without projection is its input.
    block = "group1_block2"
    probe = keras.Model(model.input, [model.get_layer("group1_block1_out").output, model.get_layer(f"{block}_out").output])
    images = np.random.default_rng(0).uniform(size=(2, 64, 64, 3)).astype("float32")
    block_input, block_output = probe(images, training=False)
    np.testing.assert_allclose(block_output, block_input, atol=1e-6)
    for layer in _layers_of_type(resnet(depth=depth, width_multiplier=0.125, image_size=64, zero_init_residual=False,
                                        selective_kernel_ratio=sk_ratio), keras.layers.BatchNormalization):
        np.testing.assert_array_equal(layer.gamma.numpy(), 1.0)


def test_zero_init_residual_reaches_the_training_flag():
    from simclr_keras import train  # noqa: F401  (defines the flags)
    from absl import flags

    assert flags.FLAGS["zero_init_residual"].default is True
    from simclr_keras.models.simclr import build_simclr

    model = build_simclr(image_size=16, width_multiplier=0.125, zero_init_residual=False)
    np.testing.assert_array_equal(model.encoder.get_layer("group1_block1_bn2").gamma.numpy(), 1.0)
    model = build_simclr(image_size=16, width_multiplier=0.125)
    np.testing.assert_array_equal(model.encoder.get_layer("group1_block1_bn2").gamma.numpy(), 0.0)
