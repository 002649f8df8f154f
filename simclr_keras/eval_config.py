"""EvalConfig: every setting of an evaluation, the fields of `python -m simclr_keras.evaluate`'s flags.

    config = EvalConfig(protocol="knn", model_dir="runs/cifar10", dataset="cifar10")
    problems = config.validate()  # [] or one-line messages, e.g. "knn_k must be >= 1, got 0."
    result = simclr_keras.evaluate_encoder(config)

Each field is one flag of the same name, default and help (simclr_keras/evaluate.py defines the
flags from these fields with `config_flags.define_flags`); the messages of `validate` name the
fields, which the command line writes as --flags (`config_flags.as_flag_message`). No TensorFlow here: the
command line validates its flags before TensorFlow loads.
"""

import dataclasses

from simclr_keras import config_flags
from simclr_keras.config_flags import bool_field, enum_field, float_field, integer_field, string_field

PROTOCOLS = ("knn", "linear", "finetune")
# The keys of simclr_keras.evaluation.LINEAR_PROTOCOLS (written out: this module must not import TensorFlow),
# and hcl_dcl, the HCL and debiased references' linear.py (evaluation.reference_linear_evaluation).
LINEAR_PROTOCOLS = ("features", "official", "hcl_dcl")
# What each linear protocol sets: (linear_augment for --protocol=linear, standardize_features).
_LINEAR_PROTOCOL_SETTINGS = {"features": (False, True), "official": (True, False), "hcl_dcl": (False, False)}
# The linear.py of the HCL and debiased references: epochs, batch size, Adam's (unscaled) rate, L2.
HCL_DCL_DEFAULTS = (100, 512, 1e-3, 1e-6)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """The settings of one evaluation; `validate()` lists what is wrong with them."""

    # Encoder
    protocol: str = string_field("linear", "knn, linear or finetune.")
    model_dir: str | None = string_field(None, "Training run whose latest checkpoint is evaluated.")
    encoder: str | None = string_field(
        None, "Exported encoder, EXPORT_DIR/<version> (or EXPORT_DIR: its highest version)."
    )
    random_init: bool = bool_field(False, "Evaluate a randomly initialised encoder of --model_dir's architecture.")
    # Data
    dataset: str = string_field(
        "cifar10", "cifar10, cifar100, stl10, imagenet2012 (TFDS, downloaded on first use) or folder:DIR."
    )
    data_dir: str | None = string_field(
        None, "TFDS data directory, where datasets are downloaded and prepared (default: TFDS's own, $TFDS_DATA_DIR)."
    )
    train_split: str = string_field("train", "Labelled split the classifier (or kNN memory) is built from.")
    eval_split: str = string_field("test", "Split the accuracy is measured on.")
    max_train_examples: int = integer_field(
        0, "Use only the first N training images (class-balanced for folders); 0: all."
    )
    strict_data: bool = bool_field(
        False, "Stop on an image-folder file that does not decode, instead of skipping it with a warning."
    )
    label_fraction: float = float_field(
        1.0, "Class-balanced fraction of the training labels used, in (0, 1] (e.g. 0.01, 0.1)."
    )
    image_size: int | None = integer_field(
        None, "Side of the evaluation views (the centre crop resized to it); default: the training size. E.g. 96 "
        "for an STL-10 encoder pretrained on 32 px crops, as the HCL/DCL references evaluate it."
    )  # fmt: skip
    seed: int = integer_field(0, "Seed of the label subset, shuffling, augmentation and --random_init weights.")
    # Protocols
    knn_k: int = integer_field(200, "kNN: number of neighbours.")
    knn_temperature: float = float_field(0.1, "kNN: temperature T of the votes exp(similarity / T).")
    epochs: int = integer_field(0, "linear, finetune: epochs; 0: 100 (linear), 60 (finetune, fraction < 0.1) or 30.")
    batch_size: int = integer_field(0, "linear, finetune: batch size B; 0: 512 (linear) or 256 (finetune).")
    learning_rate: float = float_field(
        0.0, "linear, finetune: base rate, scaled by --lr_scaling (hcl_dcl: Adam's rate, unscaled); 0: 0.1 (linear), "
        "1e-3 (hcl_dcl) or 0.05 (finetune)."
    )
    lr_scaling: str = enum_field(
        "linear", ("linear", "sqrt"), "linear, finetune: rate x B/256 (linear) or x sqrt(B) (sqrt: SimCLR v2's fine-tuning)."
    )
    optimizer: str = enum_field(
        "sgd", ("sgd", "lars"), "linear, finetune: sgd (Nesterov momentum) or lars (SimCLR v2's fine-tuning: "
        "classic momentum, trust ratio 1 for BatchNorm, biases and the classifier)."
    )  # fmt: skip
    momentum: float = float_field(0.9, "linear, finetune: momentum of --optimizer.")
    weight_decay: float = float_field(
        None, "linear, finetune: L2 weight decay (BatchNorm and biases excluded, except by hcl_dcl); default: 0, "
        "1e-6 for --linear_protocol=hcl_dcl."
    )  # fmt: skip
    linear_protocol: str = string_field(
        "features",
        "linear: 'official' (google-research/simclr: raw features of crop-and-flip views, new every epoch), "
        "'features' (unaugmented features extracted once, standardised; fast) or 'hcl_dcl' (the HCL and debiased "
        "references' linear.py: the encoder's BatchNorm in training mode on pretraining views, Adam 1e-3 with L2 "
        "1e-6, batch 512, 100 epochs). Sets the defaults of the next two flags.",
    )
    # None: as linear_protocol says (the command line leaves them None unless given).
    linear_augment: bool | None = bool_field(
        None, "linear: random crop + flip of the training images, features recomputed every epoch; "
        "default: from --linear_protocol (official: on)."
    )  # fmt: skip
    standardize_features: bool | None = bool_field(
        None, "linear: standardise each feature with the training mean and std; "
        "default: from --linear_protocol (features: on)."
    )  # fmt: skip
    head_layer: int = integer_field(
        0, "Features from the projection head's K-th layer instead of h (SimCLR v2 ft_proj_selector; 0: h)."
    )
    # Outputs
    output: str | None = string_field(None, "Write the results as JSON to this file.")
    confusion_matrix: str | None = string_field(
        None, "PNG of the test set's confusion matrix; default with --output: <output stem>_confusion.png; empty: none."
    )
    eval_batch_size: int = integer_field(500, "Batch size of feature extraction and testing.")

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def validate(self):
        """Every problem of these settings, one line each naming the field (= flag), the value received
        and what would be valid; [] if none."""
        problems = config_flags.type_problems(self)
        if problems:  # the range checks below need numbers where numbers belong
            return problems
        problems = self._source_problems() + self._range_problems()
        if self.protocol not in PROTOCOLS:
            problems.insert(0, f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}.")
        if self.linear_protocol not in LINEAR_PROTOCOLS:
            problems.append(
                f"linear_protocol must be one of {', '.join(LINEAR_PROTOCOLS)}, got {self.linear_protocol!r}."
            )
        if self.linear_augment and self.protocol != "linear":
            problems.append(f"linear_augment applies to protocol=linear, got protocol={self.protocol}.")
        return problems + self._hcl_dcl_problems()

    def _hcl_dcl_problems(self):
        """Settings of the other linear protocols given with hcl_dcl, which has its own views and optimizer."""
        if not self._is_hcl_dcl():
            return []
        conflicting = {"linear_augment": True, "standardize_features": True, "optimizer": "lars"}
        given = [f"{name}={getattr(self, name)}" for name, value in conflicting.items() if getattr(self, name) == value]
        if not given:
            return []
        return [
            f"linear_protocol=hcl_dcl trains on the pretraining augmentation's views with Adam and raw features; "
            f"{' and '.join(given)} apply to linear_protocol=features or official."
        ]

    def _source_problems(self):
        if bool(self.encoder) == bool(self.model_dir):
            given = f"encoder={self.encoder} and model_dir={self.model_dir}" if self.encoder else "neither"
            return [f"pass exactly one of encoder=EXPORT_DIR/<version> and model_dir=RUN, got {given}."]
        if self.random_init and not self.model_dir:
            return [
                f"random_init rebuilds the architecture of a model_dir run; it cannot be used with encoder={self.encoder}."
            ]
        return []

    def _range_problems(self):
        problems = []
        if not 0.0 < self.label_fraction <= 1.0:
            problems.append(f"label_fraction must be in (0, 1], got {self.label_fraction}.")
        if self.knn_k < 1:
            problems.append(f"knn_k must be >= 1, got {self.knn_k}.")
        if not self.knn_temperature > 0:
            problems.append(f"knn_temperature must be > 0, got {self.knn_temperature}.")
        for name in ("epochs", "batch_size", "learning_rate", "weight_decay", "max_train_examples", "seed"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}.")
        if not 0.0 <= self.momentum < 1.0:
            problems.append(f"momentum must be in [0, 1), got {self.momentum}.")
        if self.image_size is not None and self.image_size < 8:
            problems.append(f"image_size must be >= 8, got {self.image_size}.")
        if self.eval_batch_size < 1:
            problems.append(f"eval_batch_size must be >= 1, got {self.eval_batch_size}.")
        if self.head_layer < 0:
            problems.append(
                f"head_layer must be >= 0 (0: h, K: the projection head's K-th layer), got {self.head_layer}."
            )
        return problems

    def resolved(self):
        """This config with linear_augment and standardize_features that are None set from linear_protocol."""
        augment, standardize = _LINEAR_PROTOCOL_SETTINGS.get(self.linear_protocol, (False, True))
        augment = augment and self.protocol == "linear"  # the crops are linear evaluation's
        if self.linear_augment is not None:
            augment = self.linear_augment
        if self.standardize_features is not None:
            standardize = self.standardize_features
        weight_decay = self.weight_decay
        if weight_decay is None:
            weight_decay = HCL_DCL_DEFAULTS[3] if self._is_hcl_dcl() else 0.0
        return self.replace(linear_augment=augment, standardize_features=standardize, weight_decay=weight_decay)

    def _is_hcl_dcl(self):
        return self.protocol == "linear" and self.linear_protocol == "hcl_dcl"

    def protocol_defaults(self):
        """(epochs, batch size, base learning rate), each 0 replaced by the protocol's default."""
        if self._is_hcl_dcl():
            defaults = HCL_DCL_DEFAULTS[:3]
        elif self.protocol == "linear":
            defaults = (100, 512, 0.1)  # the official CIFAR-10 linear evaluation
        else:
            # SimCLR Appendix B.5: 60 epochs on 1% of the labels, 30 on 10%; lr 0.05 x B/256.
            defaults = (60 if self.label_fraction < 0.1 else 30, 256, 0.05)
        given = (self.epochs, self.batch_size, self.learning_rate)
        return tuple(value or default for value, default in zip(given, defaults))
