"""The method configs against the constants of their reference code (read from the code, written here).

configs/debiased_cifar10.flags: chingyaoc/DCL main.py, model.py, utils.py; configs/hcl_cifar10.flags:
joshr17/HCL image/main.py, model.py, utils.py; configs/moco_v2_cifar10.flags: the MoCo authors' CIFAR-10
demo notebook (facebookresearch/moco, colab/moco_cifar10_demo.ipynb) and MoCo v2's `--mlp` head.
"""

import os

import pytest

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def parsed_flags(config):
    from absl import flags

    import simclr_keras.train  # noqa: F401  (defines the flags)

    flags.FLAGS(["train", f"--flagfile={os.path.join(CONFIGS, config)}", "--model_dir=unused"])
    try:
        return {name: flags.FLAGS[name].value for name in flags.FLAGS}
    finally:
        flags.FLAGS.unparse_flags()


@pytest.mark.parametrize("config,beta", [("debiased_cifar10.flags", 0.0), ("hcl_cifar10.flags", 1.0)])
def test_debiased_and_hcl_configs_are_their_reference_pipelines(config, beta):
    from simclr_keras.augment import SimCLRAugmentation
    from simclr_keras.heads import ProjectionHead
    from simclr_keras.optimizers import scale_learning_rate

    values = parsed_flags(config)
    # Model(feature_dim=128) on resnet50 with a 3x3 stride-1 first conv and no max-pool; batch 256, 400 epochs.
    assert (values["backbone"], values["image_size"], values["batch_size"], values["train_epochs"]) == (
        "resnet50", 32, 256, 400,
    )
    assert (values["temperature"], values["debias_tau_plus"], values["hard_negative_beta"]) == (0.5, 0.1, beta)
    # optim.Adam(lr=1e-3, weight_decay=1e-6), the same rate every epoch.
    assert (values["optimizer"], values["weight_decay"], values["lr_schedule"], values["warmup_epochs"]) == (
        "adam", 1e-6, "constant", 0,
    )
    assert scale_learning_rate(values["learning_rate"], values["batch_size"], values["lr_scaling"]) == 1e-3
    # loss = (-log(pos / (pos + Ng))).mean() over the 2N anchors: the logged loss itself.
    assert values["objective_scale"] == 1.0
    # g = Linear(2048, 512, bias=False), BatchNorm1d(512), ReLU, Linear(512, 128, bias=True).
    head = ProjectionHead(
        num_layers=values["proj_layers"], hidden_dim=values["proj_hidden_dim"], output_dim=values["proj_dim"],
        batch_norm=values["proj_batch_norm"],
    )
    head.build((None, 2048))
    assert [(dense.kernel.shape, dense.use_bias) for dense in head.dense_layers] == [((2048, 512), False), ((512, 128), True)]
    assert head.batch_norm_layers[0] is not None and head.batch_norm_layers[1] is None
    # ColorJitter(0.4, 0.4, 0.4, 0.1) = strength 0.5; GaussianBlur(kernel_size=int(0.1 * 32)) = 3x3, p = 0.5.
    assert values["color_jitter_strength"] == 0.5 and values["use_blur"]
    augmenter = SimCLRAugmentation(values["image_size"], color_jitter_strength=0.5, use_blur=values["use_blur"])
    assert 2 * augmenter.blur_radius + 1 == 3 and augmenter.blur_probability == 0.5
    assert augmenter.blur_sigma_range == (0.1, 2.0)


def test_moco_config_is_the_demos_recipe_with_moco_v2s_head():
    from simclr_keras.optimizers import scale_learning_rate

    values = parsed_flags("moco_v2_cifar10.flags")
    assert (values["method"], values["backbone"], values["batch_size"], values["train_epochs"]) == (
        "moco_v2", "resnet18", 512, 200,
    )
    # --lr 0.06 for batch 512, --wd 5e-4, SGD momentum 0.9, --cos without warm-up.
    assert scale_learning_rate(values["learning_rate"], values["batch_size"], values["lr_scaling"]) == 0.06
    assert (values["optimizer"], values["weight_decay"], values["momentum"]) == ("sgd", 5e-4, 0.9)
    assert (values["lr_schedule"], values["warmup_epochs"]) == ("cosine", 0)
    # --moco-k 4096, --moco-m 0.99, --bn-splits 8, --symmetric (the sum of both directions).
    assert (values["moco_queue_size"], values["moco_momentum"], values["moco_bn_splits"]) == (4096, 0.99, 8)
    assert values["moco_symmetric"] and values["objective_scale"] in (None, 2.0)
    # MoCo v2 (main_moco.py --mlp): Linear(512, 512) with bias, ReLU, Linear(512, 128) with bias.
    assert (values["proj_batch_norm"], values["proj_layers"], values["proj_dim"]) == ("none", 2, 128)
    assert values["proj_hidden_dim"] in (0, 512)


def test_moco_v2_imagenet_config_is_main_moco_with_aug_plus():
    from simclr_keras.model_config import build_components
    from simclr_keras.optimizers import scale_learning_rate
    from simclr_keras.train_config import TrainConfig

    values = parsed_flags("moco_v2_imagenet.flags")
    assert (values["method"], values["backbone"], values["image_size"], values["batch_size"]) == (
        "moco_v2", "resnet50", 224, 256,
    )
    # --lr 0.03 for --batch-size 256, --wd 1e-4, torch.optim.SGD(momentum=0.9): no Nesterov, --cos, 200 epochs.
    assert scale_learning_rate(values["learning_rate"], values["batch_size"], values["lr_scaling"]) == 0.03
    assert (values["optimizer"], values["nesterov"], values["momentum"], values["weight_decay"]) == (
        "sgd", False, 0.9, 1e-4,
    )
    assert (values["lr_schedule"], values["warmup_epochs"], values["train_epochs"]) == ("cosine", 0, 200)
    # --moco-t 0.2, --moco-k 65536, --moco-m 0.999, the asymmetric loss, shuffle BN over 8 GPUs.
    assert (values["temperature"], values["moco_queue_size"], values["moco_momentum"]) == (0.2, 65536, 0.999)
    assert not values["moco_symmetric"] and values["moco_bn_splits"] == 8
    # --mlp: Linear(2048, 2048), ReLU, Linear(2048, 128), no BatchNorm.
    assert (values["proj_layers"], values["proj_hidden_dim"], values["proj_dim"], values["proj_batch_norm"]) == (
        2, 0, 128, "none",
    )
    # --aug-plus: RandomResizedCrop(224, scale=(0.2, 1.)), ColorJitter(0.4, 0.4, 0.4, 0.1), blur sigma [0.1, 2].
    config = TrainConfig(**{name: values[name] for name in TrainConfig.__dataclass_fields__})
    assert config.validate() == []
    _, _, augmenter = build_components(config.model_config())
    assert augmenter.crop_area_range == (0.2, 1.0) and augmenter.crop_sampler == "torchvision"
    assert augmenter.color_jitter_strength == 0.5 and augmenter.use_blur and augmenter.blur_sigma_per == "image"


def test_the_official_readme_imagenet_config_blurs_as_the_official_code():
    from simclr_keras.model_config import build_components
    from simclr_keras.train_config import TrainConfig

    values = parsed_flags("imagenet_official_readme.flags")
    config = TrainConfig(**{name: values[name] for name in TrainConfig.__dataclass_fields__})
    _, _, augmenter = build_components(config.model_config().replace(backbone="resnet18", width_multiplier=0.125))
    # data_util.gaussian_blur(padding="SAME"), one sigma per view batch (batch_random_blur).
    assert (augmenter.blur_padding, augmenter.blur_sigma_per, augmenter.use_blur) == ("zeros", "batch", True)
    assert augmenter.crop_area_range == (0.08, 1.0)


def test_simclr_v2_finetune_config_is_the_readme_command():
    from simclr_keras import config_flags, eval_run
    from simclr_keras.eval_config import EvalConfig
    from simclr_keras.optimizers import scale_learning_rate

    path = os.path.join(CONFIGS, "evaluation", "simclr_v2_finetune_imagenet.flags")
    config = config_flags.read_flagfile(EvalConfig, path)
    assert config.replace(model_dir="run").validate() == []
    # --optimizer=lars --learning_rate=0.005 --learning_rate_scaling=sqrt --train_batch_size=1024: 0.16.
    epochs, batch_size, base_rate = config.protocol_defaults()
    assert (config.protocol, config.optimizer, epochs, batch_size) == ("finetune", "lars", 60, 1024)
    assert scale_learning_rate(base_rate, batch_size, config.lr_scaling) == pytest.approx(0.16)
    settings = eval_run._optimizer_settings(config.replace(model_dir="run").resolved(), num_train=12_811)
    assert (settings["optimizer"], settings["nesterov"], settings["batch_size"]) == ("lars", False, 1024)
    assert settings["learning_rate"] == pytest.approx(0.005 * 1024**0.5)
    # --ft_proj_selector=1, --weight_decay=0, imagenet2012_subset/1pct.
    assert (config.head_layer, config.weight_decay, config.label_fraction) == (1, 0.0, 0.01)


def test_lars_fine_tuning_adapts_the_encoders_kernels_and_not_the_classifier():
    # The official LARS excludes batch_normalization, bias and head_supervised (the classifier) from its trust ratio.
    import keras

    from simclr_keras import evaluation
    from simclr_keras.optimizers import LARS

    encoder = keras.Sequential([
        keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3), keras.layers.BatchNormalization(),
        keras.layers.GlobalAveragePooling2D(),
    ])  # fmt: skip
    classifier = evaluation._finetuned_classifier(encoder, 3, None, 0)
    optimizer = evaluation._momentum_optimizer(0.16, 100, 0.9, 0.0, "lars")
    assert isinstance(optimizer, LARS) and not optimizer.nesterov
    adapted = [variable.path for variable in classifier.trainable_variables if optimizer.applies_layer_adaptation(variable)]
    assert len(classifier.trainable_variables) == 6 and adapted == [encoder.layers[0].kernel.path]


def test_hcl_stl10_config_pretrains_on_32_pixel_crops_with_the_cifar_stem():
    from simclr_keras.backbones import resolve_stem

    stl10, cifar10 = parsed_flags("hcl_stl10.flags"), parsed_flags("hcl_cifar10.flags")
    # utils.py: STL10(split='train+unlabeled', transform=train_transform), RandomResizedCrop(32) of 96 px images.
    assert (stl10["dataset"], stl10["train_split"], stl10["image_size"]) == ("stl10", "", 32)
    assert resolve_stem("auto", stl10["image_size"]) == "cifar"
    # Everything else is the code's defaults, those of the CIFAR-10 setting.
    assert {name: value for name, value in stl10.items() if name != "dataset"} == {
        name: value for name, value in cifar10.items() if name != "dataset"
    }
