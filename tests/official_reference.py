"""An independent plain-TensorFlow model of the official SimCLR tf2 network, for the importer's tests.

Written from google-research/simclr tf2/resnet.py and tf2/model.py (commit 383d414), sharing no
code with simclr_keras: it names every variable as Keras 2 would (a global counter per layer base
name, in creation order, under the name scopes of the calling layers) and computes the official
forward pass (Conv2dFixedPadding, BatchNormRelu, BottleneckBlock with ResNet-D shortcuts and
SK_Conv2D when sk_ratio > 0, ProjectionHead, SupervisedHead) from a {name: value} mapping.
`tests/test_official.py` checks it against the official variable lists and numeric oracle in
../shared/official_simclr/ before trusting it.
"""

import numpy as np
import tensorflow as tf

EPSILON = 1e-5
BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


class _Names:
    """Keras 2's unique layer names: base, base_1, base_2, ... per base, in creation order."""

    def __init__(self, offset=0):
        self.offset = offset
        self.counts = {}

    def __call__(self, base):
        count = self.counts.get(base, self.offset)
        self.counts[base] = count + 1
        return base if count == 0 else f"{base}_{count}"


class OfficialNetwork:
    """Variable names/shapes (`variables`, capture order) and forward pass of tf2 `model.Model`."""

    def __init__(self, depth=50, width=1, sk_ratio=0.0, proj_layers=3, proj_dim=128, num_classes=1000, counter_offset=0):
        self.variables = []  # [(name, shape, trainable)]
        self.sk_ratio = sk_ratio
        names = _Names(counter_offset)  # > 0: as if other layers had been created first
        self.stem = self._stem(names, width)
        self.groups = []
        in_channels = int(64 * width)
        for group, (base, blocks, stride) in enumerate(zip((64, 128, 256, 512), BLOCKS[depth], (1, 2, 2, 2)), 1):
            filters = int(base * width)
            scope = f"resnet/block_group{group}"
            group_blocks = []
            for index in range(blocks):
                group_blocks.append(self._block(names, scope, in_channels, filters, stride if index == 0 else 1, index == 0))
                in_channels = 4 * filters
            self.groups.append(group_blocks)
        # ProjectionHead.__init__ makes its BatchNormRelus; the Dense layers are made when called.
        self.head = []
        for layer in range(proj_layers):
            last = layer == proj_layers - 1
            # LinearLayer's BatchNormRelu has no ReLU; the head adds one after the middle layers.
            bn = self._batch_norm(names, f"projection_head/nl_{layer}", proj_dim if last else in_channels,
                                  center=not last, relu=not last)
            self.head.append([None, bn, last])
        for layer, entry in enumerate(self.head):
            units = proj_dim if entry[2] else in_channels
            entry[0] = self._variable(f"projection_head/nl_{layer}/{names('dense')}/kernel", (in_channels, units))
        self.classifier = None
        if num_classes:
            scope = f"head_supervised/linear_layer/{names('dense')}"
            self.classifier = (self._variable(f"{scope}/kernel", (in_channels, num_classes)),
                               self._variable(f"{scope}/bias", (num_classes,)))
        self._reorder_head_variables()

    def _reorder_head_variables(self):
        # Capture order (the official lists): each head layer's kernel before its batch norm.
        resnet = [entry for entry in self.variables if entry[0].startswith("resnet/")]
        head = []
        for kernel, bn, _ in self.head:
            head += [entry for entry in self.variables if entry[0] == kernel]
            head += [entry for entry in self.variables if entry[0].startswith(bn["scope"] + "/")]
        rest = [entry for entry in self.variables if entry[0].startswith("head_supervised/")]
        self.variables = resnet + head + rest

    def _variable(self, name, shape, trainable=True):
        self.variables.append((name, tuple(shape), trainable))
        return name

    def _conv(self, names, scope, kernel_size, in_channels, out_channels, stride, fixed_padding=True):
        if fixed_padding:  # Conv2dFixedPadding names itself, then its Conv2D
            scope = f"{scope}/{names('conv2d_fixed_padding')}"
        kernel = self._variable(f"{scope}/{names('conv2d')}/kernel", (kernel_size, kernel_size, in_channels, out_channels))
        return {"kernel": kernel, "size": kernel_size, "stride": stride}

    def _batch_norm(self, names, scope, channels, center=True, relu=True):
        scope = f"{scope}/{names('batch_norm_relu')}/{names('sync_batch_normalization')}"
        for variable in ("moving_mean", "moving_variance", "gamma", "beta"):
            if variable != "beta" or center:
                self._variable(f"{scope}/{variable}", (channels,), trainable=not variable.startswith("moving"))
        return {"scope": scope, "center": center, "relu": relu}

    def _stem(self, names, width):
        layers = []
        if self.sk_ratio > 0:
            for channels_in, channels_out, stride in ((3, int(64 * width) // 2, 2), (int(64 * width) // 2, int(64 * width) // 2, 1)):
                layers.append(self._conv(names, "resnet", 3, channels_in, channels_out, stride))
                layers.append(self._batch_norm(names, "resnet", channels_out))
            layers.append(self._conv(names, "resnet", 3, int(64 * width) // 2, int(64 * width), 1))
        else:
            layers.append(self._conv(names, "resnet", 7, 3, int(64 * width), 2))
        layers.append("initial_conv")
        layers.append(self._batch_norm(names, "resnet", int(64 * width)))
        return layers

    def _block(self, names, scope, in_channels, filters, stride, projection):
        scope = f"{scope}/{names('bottleneck_block')}"
        block = {"stride": stride, "shortcut": [], "residual": []}
        if projection:
            conv_stride = 1 if self.sk_ratio > 0 else stride  # ResNet-D pools first
            block["shortcut"] = [self._conv(names, scope, 1, in_channels, 4 * filters, conv_stride),
                                 self._batch_norm(names, scope, 4 * filters, relu=False)]
        residual = block["residual"]
        residual += [self._conv(names, scope, 1, in_channels, filters, 1), self._batch_norm(names, scope, filters)]
        if self.sk_ratio > 0:
            residual.append(self._selective_kernel(names, scope, filters, stride))
        else:
            residual += [self._conv(names, scope, 3, filters, filters, stride), self._batch_norm(names, scope, filters)]
        residual += [self._conv(names, scope, 1, filters, 4 * filters, 1),
                     self._batch_norm(names, scope, 4 * filters, relu=False)]
        return block

    def _selective_kernel(self, names, scope, filters, stride):
        scope = f"{scope}/{names('sk__conv2d')}"
        middle = max(int(filters * self.sk_ratio), 32)
        return {
            "sk": True,
            "conv": self._conv(names, scope, 3, filters, 2 * filters, stride),
            "bn": self._batch_norm(names, scope, 2 * filters),
            "reduce": self._conv(names, scope, 1, filters, middle, 1, fixed_padding=False),
            "bn_1": self._batch_norm(names, scope, middle),
            "expand": self._conv(names, scope, 1, middle, 2 * filters, 1, fixed_padding=False),
        }

    # ----------------------------------------------------------------------------- forward pass

    def random_values(self, seed=0):
        """Plausible random weights and BatchNorm statistics (not 0 and 1), by variable name."""
        rng = np.random.default_rng(seed)
        values = {}
        for name, shape, _ in self.variables:
            leaf = name.rsplit("/", 1)[-1]
            if leaf == "kernel":
                value = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
            elif leaf in ("gamma", "moving_variance"):
                value = rng.uniform(0.5, 1.5, size=shape)
            else:  # beta, moving_mean, bias
                value = rng.normal(scale=0.1, size=shape)
            values[name] = value.astype(np.float32)
        return values

    def forward(self, values, images, training=False):
        """The dict of the official SavedModel's __call__; values maps variable names to tensors."""
        outputs = {}
        x = images
        for layer in self.stem:
            if layer == "initial_conv":
                outputs["initial_conv"] = x
            else:
                x = self._apply(values, layer, x, training)
        x = tf.nn.max_pool2d(x, 3, 2, "SAME")
        outputs["initial_max_pool"] = x
        for group, blocks in enumerate(self.groups, 1):
            for block in blocks:
                x = self._apply_block(values, block, x, training)
            outputs[f"block_group{group}"] = x
        hidden = tf.reduce_mean(x, [1, 2])
        outputs["final_avg_pool"] = outputs["proj_head_input"] = hidden
        for kernel, bn, last in self.head:
            hidden = self._apply(values, bn, tf.matmul(hidden, values[kernel]), training)
        if self.head:
            outputs["proj_head_output"] = hidden
        if self.classifier:
            outputs["logits_sup"] = tf.matmul(outputs["final_avg_pool"], values[self.classifier[0]]) + values[self.classifier[1]]
        return outputs

    def _apply(self, values, layer, x, training):
        if "sk" in layer:
            return self._apply_selective_kernel(values, layer, x, training)
        if "kernel" in layer:
            if layer["stride"] > 1:
                begin = (layer["size"] - 1) // 2
                x = tf.pad(x, [[0, 0], [begin, layer["size"] - 1 - begin], [begin, layer["size"] - 1 - begin], [0, 0]])
            return tf.nn.conv2d(x, values[layer["kernel"]], layer["stride"], "SAME" if layer["stride"] == 1 else "VALID")
        scope = layer["scope"]
        if training:
            mean, variance = tf.nn.moments(x, axes=list(range(len(x.shape) - 1)))
        else:
            mean, variance = values[f"{scope}/moving_mean"], values[f"{scope}/moving_variance"]
        x = (x - mean) / tf.sqrt(variance + EPSILON) * values[f"{scope}/gamma"]
        if layer["center"]:
            x = x + values[f"{scope}/beta"]
        return tf.nn.relu(x) if layer["relu"] else x

    def _apply_block(self, values, block, x, training):
        shortcut = x
        if block["shortcut"]:
            if self.sk_ratio > 0:
                if block["stride"] > 1:
                    shortcut = tf.nn.avg_pool2d(tf.pad(shortcut, [[0, 0], [0, 1], [0, 1], [0, 0]]), 2, block["stride"], "VALID")
                else:
                    shortcut = tf.nn.avg_pool2d(shortcut, 2, 1, "SAME")
            for layer in block["shortcut"]:
                shortcut = self._apply(values, layer, shortcut, training)
        for layer in block["residual"]:
            x = self._apply(values, layer, x, training)
        return tf.nn.relu(x + shortcut)

    def _apply_selective_kernel(self, values, layer, x, training):
        x = self._apply(values, layer["bn"], self._apply(values, layer["conv"], x, training), training)
        streams = tf.stack(tf.split(x, 2, axis=3))
        pooled = tf.reduce_mean(tf.reduce_sum(streams, 0), [1, 2], keepdims=True)
        mixing = self._apply(values, layer["bn_1"], self._apply(values, layer["reduce"], pooled, training), training)
        mixing = tf.nn.softmax(tf.stack(tf.split(self._apply(values, layer["expand"], mixing, training), 2, axis=3)), axis=0)
        return tf.reduce_sum(streams * mixing, 0)


class FakeOfficialSavedModel(tf.Module):
    """What tf2/run.py's build_saved_model saves: `model`, `trainable_variables_list`, `__call__`."""

    def __init__(self, network, values):
        super().__init__()
        self.model = tf.Module()
        self.model.all_variables = [
            tf.Variable(values[name], name=name, trainable=trainable) for name, _, trainable in network.variables
        ]
        self.trainable_variables_list = [variable for variable in self.model.all_variables if variable.trainable]
        self._network = network
        self._by_name = {name: variable for (name, _, _), variable in zip(network.variables, self.model.all_variables)}

    @tf.function
    def __call__(self, inputs, trainable):
        return self._network.forward(self._by_name, inputs, training=trainable)


def save_fake_official(path, network, values):
    """Writes a SavedModel with the official layout, names and signature; returns path."""
    module = FakeOfficialSavedModel(network, values)
    spec = tf.TensorSpec([None, None, None, 3], tf.float32)
    module.__call__.get_concrete_function(spec, trainable=True)
    module.__call__.get_concrete_function(spec, trainable=False)
    tf.saved_model.save(module, str(path))
    return str(path)
