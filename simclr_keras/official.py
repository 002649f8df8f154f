"""The official SimCLR v1 / v2 TF2 SavedModels (google-research/simclr) as trainable SimCLR models.

    model = simclr_keras.from_official_simclr("r50_1x_sk0/saved_model")

An official SavedModel (`run.build_saved_model` in tf2/run.py) is a tf.Module with a `model` and a
`trainable_variables_list`, one function `__call__(inputs, trainable)` taking float images in
[0, 1] (224 px after the official 87.5% centre crop for ImageNet) and returning a dict of
`final_avg_pool` (h), `proj_head_output` (z), `logits_sup`, ...; its variables are named by the
Keras-2 layers that made them, e.g.
`resnet/block_group1/bottleneck_block_1/conv2d_fixed_padding_7/conv2d_9/kernel:0`.

The import maps variables by structure, never by the numbers in those names: each path element's
Keras-2 counter is replaced by its rank among its siblings of the same kind
(`bottleneck_block_5` under block_group2 -> `bottleneck_block[2]`), which survives checkpoints
written by a process that created other layers first. The variant (depth 50/101/152, width,
selective kernels, projection-head depth, classes) is read from the variables, the complete list
the variant must have is generated, and every variable must match exactly one entry, shape
included, before anything is assigned: a missing, extra or misshapen variable stops the import
with one line naming it. Finally the imported model is run beside the SavedModel on the same images
and must give the same h, z and logits (`verify`).
"""

import dataclasses
import os
import re

import numpy as np

# blocks per group -> depth, as in the official resnet.py (bottleneck blocks only).
OFFICIAL_DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}
OFFICIAL_SK_RATIO = 0.0625  # the official *_sk1 models
IMAGE_SIZE = 224
EVAL_CROP_FRACTION = 0.875  # the official CROP_PROPORTION
_BATCH_NORM_VARIABLES = ("gamma", "beta", "moving_mean", "moving_variance")
_GROUP_BASE_FILTERS = (64, 128, 256, 512)
_COUNTED = re.compile(r"^(?P<base>.*?)(?:_(?P<counter>\d+))?$")


class NotOfficialSimCLRError(ValueError):
    """The directory is not an official SimCLR SavedModel, or not one this importer supports."""


@dataclasses.dataclass(frozen=True)
class OfficialVariant:
    """What an official checkpoint is, read from its variables.

    Attributes:
      depth: 50, 101 or 152.
      width_multiplier: 1, 2, 3 (v2) or 1, 2, 4 (v1).
      selective_kernel_ratio: 0 (`*_sk0`) or 0.0625 (`*_sk1`).
      projection_layers: layers of the projection head; 0 when the checkpoint has none (SimCLR v1).
      projection_dim: width of z (128), or None without a head.
      num_classes: outputs of the supervised linear head (1000), or None without one.
    """

    depth: int
    width_multiplier: float
    selective_kernel_ratio: float
    projection_layers: int
    projection_dim: int = None
    num_classes: int = None

    @property
    def name(self):
        """The official folder name, e.g. r50_1x_sk0."""
        return f"r{self.depth}_{self.width_multiplier:g}x_sk{int(self.selective_kernel_ratio > 0)}"


def canonical_names(official_names):
    """{canonical name: official name}, each Keras-2 counter replaced by a rank among its siblings.

    `resnet/block_group2/bottleneck_block_4/conv2d_fixed_padding_15/conv2d_15/kernel:0` becomes
    `resnet/block_group2/bottleneck_block[1]/conv2d_fixed_padding[1]/conv2d[0]/kernel` when
    bottleneck_block_3 is its first sibling and conv2d_fixed_padding_14 its first; synchronized
    and plain batch normalisation read alike (`batch_normalization[k]`).
    """
    split = {}
    for official in official_names:
        parts = official.split(":")[0].split("/")
        split[official] = [part.replace("sync_batch_normalization", "batch_normalization") for part in parts]
    siblings = {}  # (parent path, base) -> {counter}
    for parts in split.values():
        for depth in range(len(parts) - 1):  # the leaf (kernel, gamma, ...) keeps its name
            match = _COUNTED.match(parts[depth])
            key = (tuple(parts[:depth]), match["base"])
            siblings.setdefault(key, set()).add(int(match["counter"] or 0))
    result = {}
    for official, parts in split.items():
        canonical = []
        for depth, part in enumerate(parts[:-1]):
            match = _COUNTED.match(part)
            counters = sorted(siblings[(tuple(parts[:depth]), match["base"])])
            canonical.append(f"{match['base']}[{counters.index(int(match['counter'] or 0))}]")
        name = "/".join(canonical + parts[-1:])
        if name in result:
            raise NotOfficialSimCLRError(f"variables {result[name]} and {official} are the same layer twice.")
        result[name] = official
    return result


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one official variable goes: `component` ("encoder", "projection_head", "probe"),
    the layer inside it, and the attribute path of the Keras variable ("kernel", "conv.kernel")."""

    component: str
    layer: str
    attribute: str


def _conv(prefix, kernel_size, in_channels, out_channels, layer, attribute="kernel"):
    return {f"{prefix}/kernel": ((kernel_size, kernel_size, in_channels, out_channels), Target("encoder", layer, attribute))}


def _batch_norm(prefix, channels, component, layer, attribute_prefix="", center=True):
    entries = {}
    for variable in _BATCH_NORM_VARIABLES:
        if variable == "beta" and not center:
            continue
        entries[f"{prefix}/batch_normalization[0]/{variable}"] = (
            (channels,), Target(component, layer, attribute_prefix + variable)
        )
    return entries


def _conv_bn(scope, conv_rank, bn_rank, kernel_size, in_channels, out_channels, conv_layer, bn_layer):
    """One Conv2dFixedPadding + BatchNormRelu pair of the official code."""
    entries = _conv(f"{scope}/conv2d_fixed_padding[{conv_rank}]/conv2d[0]", kernel_size, in_channels, out_channels, conv_layer)
    entries.update(_batch_norm(f"{scope}/batch_norm_relu[{bn_rank}]", out_channels, "encoder", bn_layer))
    return entries


def _stem_layout(width, selective_kernels):
    stem_filters = _filters(64, width)
    if not selective_kernels:
        return _conv_bn("resnet[0]", 0, 0, 7, 3, stem_filters, "stem_conv", "stem_bn")
    half = _filters(32, width)
    entries = _conv_bn("resnet[0]", 0, 0, 3, 3, half, "stem_conv1", "stem_bn1")
    entries.update(_conv_bn("resnet[0]", 1, 1, 3, half, half, "stem_conv2", "stem_bn2"))
    entries.update(_conv_bn("resnet[0]", 2, 2, 3, half, stem_filters, "stem_conv", "stem_bn"))
    return entries


def _selective_kernel_layout(scope, filters, layer):
    attention = max(int(filters * OFFICIAL_SK_RATIO), 32)
    entries = _conv(f"{scope}/conv2d_fixed_padding[0]/conv2d[0]", 3, filters, 2 * filters, layer, "conv.kernel")
    entries.update(_batch_norm(f"{scope}/batch_norm_relu[0]", 2 * filters, "encoder", layer, "batch_norm."))
    entries.update(_conv(f"{scope}/conv2d[0]", 1, filters, attention, layer, "attention_reduce.kernel"))
    entries.update(_batch_norm(f"{scope}/batch_norm_relu[1]", attention, "encoder", layer, "attention_batch_norm."))
    entries.update(_conv(f"{scope}/conv2d[1]", 1, attention, 2 * filters, layer, "attention_expand.kernel"))
    return entries


def _bottleneck_layout(scope, in_channels, filters, projection, selective_kernels, name):
    """The variables of one official BottleneckBlock, in its creation order (which the ranks follow)."""
    out_channels = 4 * filters
    entries, conv_rank, bn_rank = {}, 0, 0
    steps = [(1, in_channels, filters, "conv1", "bn1")]
    if projection:
        steps.insert(0, (1, in_channels, out_channels, "shortcut_conv", "shortcut_bn"))
    if selective_kernels:
        entries.update(_selective_kernel_layout(f"{scope}/sk__conv2d[0]", filters, f"{name}_conv2"))
    else:
        steps.append((3, filters, filters, "conv2", "bn2"))
    steps.append((1, filters, out_channels, "conv3", "bn3"))
    for kernel_size, step_in, step_out, conv_name, bn_name in steps:
        entries.update(
            _conv_bn(scope, conv_rank, bn_rank, kernel_size, step_in, step_out, f"{name}_{conv_name}", f"{name}_{bn_name}")
        )
        conv_rank, bn_rank = conv_rank + 1, bn_rank + 1
    return entries


def _filters(base, width):
    return max(1, int(round(base * width)))


def encoder_layout(variant):
    """{canonical name: (shape, Target)} of every ResNet variable of an official model."""
    blocks = {depth: groups for groups, depth in OFFICIAL_DEPTHS.items()}[variant.depth]
    selective_kernels = variant.selective_kernel_ratio > 0
    entries = _stem_layout(variant.width_multiplier, selective_kernels)
    in_channels = _filters(64, variant.width_multiplier)
    for group, (base, num_blocks) in enumerate(zip(_GROUP_BASE_FILTERS, blocks), start=1):
        filters = _filters(base, variant.width_multiplier)
        for block in range(num_blocks):
            entries.update(
                _bottleneck_layout(
                    f"resnet[0]/block_group{group}[0]/bottleneck_block[{block}]", in_channels, filters, block == 0,
                    selective_kernels, f"group{group}_block{block + 1}",
                )
            )
            in_channels = 4 * filters
    return entries


def heads_layout(variant):
    """{canonical name: (shape, Target)} of the projection head and the supervised head."""
    entries = {}
    representation_dim = 4 * _filters(512, variant.width_multiplier)
    for layer in range(variant.projection_layers):
        last = layer == variant.projection_layers - 1
        units = variant.projection_dim if last else representation_dim
        scope = f"projection_head[0]/nl[{layer}]"
        entries[f"{scope}/dense[0]/kernel"] = ((representation_dim, units), Target("projection_head", f"dense_{layer}", "kernel"))
        entries.update(
            _batch_norm(f"{scope}/batch_norm_relu[0]", units, "projection_head", f"batch_norm_{layer}", center=not last)
        )
    if variant.num_classes:
        scope = "head_supervised[0]/linear_layer[0]/dense[0]"
        entries[f"{scope}/kernel"] = ((representation_dim, variant.num_classes), Target("probe", "classifier", "kernel"))
        entries[f"{scope}/bias"] = ((variant.num_classes,), Target("probe", "classifier", "bias"))
    return entries


def official_layout(variant):
    """Every variable an official model of this variant has: {canonical name: (shape, Target)}."""
    return {**encoder_layout(variant), **heads_layout(variant)}


def _ordinal_problem(problems, path):
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    return NotOfficialSimCLRError(f"{path}: {problems[0]}{more}; nothing was imported.")


def _width(out_channels):
    width = out_channels / 64
    return int(width) if width.is_integer() else width


def detect_variant(shapes, path="the SavedModel"):
    """The `OfficialVariant` of {official variable name: shape}; raises NotOfficialSimCLRError if none fits."""
    canonical = canonical_names(shapes)
    names = list(canonical)
    if not any(name.startswith("resnet[0]/block_group1[0]/") for name in names):
        raise NotOfficialSimCLRError(
            f"{path} is not an official SimCLR SavedModel: none of its {len(names)} variables is named "
            "resnet/block_group1/... as google-research/simclr's tf2/resnet.py names them."
        )
    if any("/residual_block[" in name for name in names):
        raise NotOfficialSimCLRError(
            f"{path} is an official ResNet-18/34 (basic blocks), an unsupported variant: the published SimCLR "
            "checkpoints, and this importer, are ResNet-50, 101 and 152."
        )
    blocks = tuple(
        len({name.split("/")[2] for name in names if name.startswith(f"resnet[0]/block_group{group}[0]/")})
        for group in range(1, 5)
    )
    if blocks not in OFFICIAL_DEPTHS:
        raise NotOfficialSimCLRError(
            f"{path} has {blocks} blocks per group, an unsupported variant: expected one of "
            + ", ".join(f"{groups} (ResNet-{depth})" for groups, depth in OFFICIAL_DEPTHS.items())
            + "."
        )
    if any(name.startswith("projection_head[0]/l[") for name in names):
        raise NotOfficialSimCLRError(f"{path} has a linear projection head (proj_head_mode=linear), an unsupported variant.")
    first_conv = canonical.get("resnet[0]/block_group1[0]/bottleneck_block[0]/conv2d_fixed_padding[1]/conv2d[0]/kernel")
    if first_conv is None:
        raise NotOfficialSimCLRError(f"{path}: the first block of block_group1 has no second convolution kernel; nothing was imported.")
    projection_layers = len({name.split("/")[1] for name in names if name.startswith("projection_head[0]/nl[")})
    projection_kernel = canonical.get(f"projection_head[0]/nl[{projection_layers - 1}]/dense[0]/kernel")
    classifier_kernel = canonical.get("head_supervised[0]/linear_layer[0]/dense[0]/kernel")
    return OfficialVariant(
        depth=OFFICIAL_DEPTHS[blocks],
        width_multiplier=_width(shapes[first_conv][-1]),
        selective_kernel_ratio=OFFICIAL_SK_RATIO if any("/sk__conv2d[" in name for name in names) else 0.0,
        projection_layers=projection_layers,
        projection_dim=int(shapes[projection_kernel][-1]) if projection_kernel else None,
        num_classes=int(shapes[classifier_kernel][-1]) if classifier_kernel else None,
    )


def match_layout(variant, shapes, path="the SavedModel"):
    """[(official name, Target)] covering every variable once; raises on a missing, extra or misshapen one."""
    canonical = canonical_names(shapes)
    layout = official_layout(variant)
    problems = []
    for name, official in canonical.items():
        if name not in layout:
            problems.append(f"unexpected variable {official}: an official {variant.name} model has none there")
        elif tuple(shapes[official]) != layout[name][0]:
            problems.append(
                f"variable {official} has shape {tuple(shapes[official])}, an official {variant.name} model has "
                f"{layout[name][0]} there ({layout[name][1].component} layer {layout[name][1].layer})"
            )
    for name, (shape, target) in layout.items():
        if name not in canonical:
            problems.append(
                f"variable {name} (shape {shape}, for {target.component} layer {target.layer}) is missing, "
                f"which an official {variant.name} model has"
            )
    if problems:
        raise _ordinal_problem(problems, path)
    return [(official, layout[name][1]) for name, official in canonical.items()]


def read_saved_model(path):
    """(loaded SavedModel, {official variable name: tf.Variable}) of an official SimCLR SavedModel."""
    import tensorflow as tf

    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise NotOfficialSimCLRError(
            f"{path} holds no saved_model.pb; pass the folder of an official SimCLR SavedModel "
            "(e.g. a local copy of gs://simclr-checkpoints-tf2/simclrv2/pretrained/r50_1x_sk0/saved_model/)."
        )
    try:
        loaded = tf.saved_model.load(path)
    except Exception as error:  # a damaged file raises OpError, DecodeError, ValueError...
        raise NotOfficialSimCLRError(f"{path} does not load as a SavedModel ({type(error).__name__}: {error})") from None
    functions = getattr(getattr(loaded, "__call__", None), "concrete_functions", None)
    if not functions or not hasattr(loaded, "trainable_variables_list"):
        export_hint = " (it is a simclr_keras export: use simclr_keras.load_encoder)" if hasattr(loaded, "encoder_variables") else ""
        raise NotOfficialSimCLRError(
            f"{path} is not an official SimCLR SavedModel: it lacks the __call__(inputs, trainable) function and "
            f"the trainable_variables_list that google-research/simclr's tf2/run.py writes{export_hint}."
        )
    variables = {}
    for function in functions:
        for variable in function.variables:
            if variables.setdefault(variable.name, variable) is not variable and variables[variable.name].shape != variable.shape:
                raise NotOfficialSimCLRError(f"{path} has two different variables named {variable.name}.")
    return loaded, variables


def build_model(variant):
    """A freshly initialised SimCLR model with the architecture of an official variant."""
    from simclr_keras.augment import SimCLRAugmentation
    from simclr_keras.backbones import resnet
    from simclr_keras.heads import ProjectionHead
    from simclr_keras.models.simclr import SimCLR

    encoder = resnet(
        depth=variant.depth,
        width_multiplier=variant.width_multiplier,
        image_size=IMAGE_SIZE,
        stem="imagenet",
        selective_kernel_ratio=variant.selective_kernel_ratio,
        name="encoder",
    )
    # SimCLR v1 checkpoints have no head: a new one, as v1's (2 layers, 128), continues pretraining.
    head = ProjectionHead(
        num_layers=variant.projection_layers or 2, output_dim=variant.projection_dim or 128, name="projection_head"
    )
    # The official ImageNet settings: colour strength 1, blur, and the 87.5% centre crop at evaluation.
    augmenter = SimCLRAugmentation(
        IMAGE_SIZE, color_jitter_strength=1.0, use_blur=True, eval_crop_fraction=EVAL_CROP_FRACTION, name="augmenter"
    )
    return SimCLR(
        encoder=encoder, projection_head=head, augmenter=augmenter, temperature=0.1,
        num_classes=variant.num_classes, name="simclr",
    )


def target_variable(model, target):
    """The Keras variable of `model` that a Target names."""
    component = getattr(model, target.component)
    layer = component.get_layer(target.layer) if target.component == "encoder" else getattr(component, target.layer)
    for attribute in target.attribute.split("."):
        layer = getattr(layer, attribute)
    return layer


def assign(model, values_by_target):
    """Writes [(Target, array)] into the model; each Target once, shapes checked."""
    seen = set()
    for target, value in values_by_target:
        variable = target_variable(model, target)
        if target in seen or tuple(variable.shape) != tuple(np.shape(value)):
            raise ValueError(f"internal mapping error at {target}: shape {tuple(variable.shape)}, value {np.shape(value)}.")
        seen.add(target)
        variable.assign(value)
    if model.probe is not None and any(target.component == "probe" for target in seen):
        # The official classifier reads h as it is: the probe's standardisation becomes the identity
        # ((h - 0) / sqrt(1 - eps + eps)) until further training updates its statistics.
        normalization = model.probe.normalization
        normalization.moving_mean.assign(np.zeros(normalization.moving_mean.shape, np.float32))
        normalization.moving_variance.assign(np.full(normalization.moving_variance.shape, 1.0 - normalization.epsilon, np.float32))


def verify(model, loaded, variant, path="the SavedModel", tolerance=1e-3):
    """{output: largest error relative to the output's largest magnitude} of model against the SavedModel.

    Both run in inference mode on two random 64 x 64 images; raises if an output differs by more
    than `tolerance`.
    """
    import tensorflow as tf

    images = np.random.default_rng(0).uniform(size=(2, 64, 64, 3)).astype(np.float32)
    official = loaded(tf.constant(images), trainable=False)
    ours = {"final_avg_pool": model.encoder(images, training=False)}
    if variant.projection_layers:
        ours["proj_head_output"] = model.projection_head(ours["final_avg_pool"], training=False)
    if variant.num_classes:
        ours["logits_sup"] = model.probe(ours["final_avg_pool"], training=False)
    errors = {}
    for output, value in ours.items():
        if output not in official:
            raise NotOfficialSimCLRError(f"{path}: its __call__ returns no {output}, which official SavedModels do.")
        reference = np.asarray(official[output])
        errors[output] = float(np.max(np.abs(np.asarray(value) - reference)) / max(np.max(np.abs(reference)), 1e-12))
        if not errors[output] <= tolerance:
            hint = " (a fine-tuned checkpoint whose classifier reads a projection-head layer is not supported)" if output == "logits_sup" else ""
            raise NotOfficialSimCLRError(
                f"{path}: the imported model's {output} differs from the SavedModel's by {errors[output]:.2e} "
                f"(relative; at most {tolerance:g} expected){hint}."
            )
    return errors


def import_official_simclr(path, verify_outputs=True):
    """(SimCLR model, OfficialVariant, {output: relative error}) from an official SavedModel directory."""
    loaded, variables = read_saved_model(path)
    shapes = {name: tuple(variable.shape) for name, variable in variables.items()}
    variant = detect_variant(shapes, path)
    matched = match_layout(variant, shapes, path)
    model = build_model(variant)
    assign(model, ((target, variables[official].numpy()) for official, target in matched))
    errors = verify(model, loaded, variant, path) if verify_outputs else {}
    return model, variant, errors


def from_official_simclr(path, verify=True):
    """A trainable `SimCLR` model from an official SimCLR v1/v2 TF2 SavedModel directory.

    The encoder is our ResNet with the official weights and BatchNorm statistics (ResNet-50, 101
    or 152, any width, with or without selective kernels); the projection head is the
    checkpoint's (3 layers in SimCLR v2; a new 2-layer head for SimCLR v1 checkpoints, which
    have none); the supervised linear head becomes the model's `probe` (`model.probe(h)` gives
    the official `logits_sup`). Inputs follow the official convention: the encoder takes float
    images in [0, 1] at 224 px; `model.augmenter(images, training=False)` makes them from uint8
    images of any size with the official 87.5% centre crop.

    Args:
      path: str; the folder holding the SavedModel's saved_model.pb.
      verify: bool; run the SavedModel and the imported model on the same images and raise if
        h, z or the logits differ by more than 1e-3 of their largest magnitude.

    Raises:
      NotOfficialSimCLRError (a ValueError): not an official SimCLR SavedModel, an unsupported
        variant, or a missing, extra or misshapen variable (named); nothing is imported then.
    """
    return import_official_simclr(path, verify)[0]
