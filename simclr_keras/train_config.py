"""TrainConfig: every setting of a pretraining run, the fields of `python -m simclr_keras.train`'s flags.

    config = TrainConfig(dataset="cifar10", model_dir="runs/quickstart", train_steps=100)
    problems = config.validate()  # [] or one-line messages, e.g. "temperature must be > 0, got 0.0."
    result = simclr_keras.pretrain(config)

Each field is one flag of the same name, default and help (simclr_keras/train.py defines the flags
from these fields, `config_flags.define_flags`). No TensorFlow here: the command line validates its
flags before TensorFlow loads.
"""

import dataclasses
import os

from simclr_keras import config_flags, model_config
from simclr_keras.config_flags import bool_field, enum_field, float_field, integer_field, list_field, string_field

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")  # distribute.STRATEGIES, written out (no TensorFlow)
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
FLAGS_FILE = "flags.txt"


class ConfigError(ValueError):
    """Settings that cannot run: `problems` holds one line per problem, naming the field and the value."""

    def __init__(self, problems):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(" ".join(self.problems))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The settings of one pretraining run; `validate()` lists what is wrong with them."""

    # Data
    dataset: str = string_field(
        "cifar10", "cifar10, cifar100, stl10, imagenet2012 (TFDS, downloaded on first use) or folder:DIR."
    )
    data_dir: str = string_field(
        None, "TFDS data directory, where datasets are downloaded and prepared (default: TFDS's own, $TFDS_DATA_DIR)."
    )
    train_split: str = string_field("", "Pretraining split; empty: train (+unlabelled where the dataset has it).")
    eval_split: str = string_field("test", "Split the online probe is evaluated on after training; empty: none.")
    max_train_examples: int = integer_field(0, "Use only the first N training images (class-balanced for folders); 0: all.")
    image_size: int = integer_field(32, "Side of the square views fed to the encoder, in pixels.")
    seed: int = integer_field(0, "Seed of data order, augmentation and initialisation.")
    strict_data: bool = bool_field(False, "Stop on an image-folder file that does not decode, instead of skipping it with a warning.")
    # Model
    backbone: str = enum_field("resnet18", model_config.BACKBONE_DEPTHS, "Encoder f.")
    width_multiplier: float = float_field(1.0, "Channel width multiplier of the ResNet.")
    zero_init_residual: bool = bool_field(
        True, "Start the last BatchNorm gamma of every residual block at 0, as the official ResNet (init_zero); False: at 1."
    )
    proj_layers: int = integer_field(
        2, "Projection head depth: 2 = SimCLR v1, 3 = SimCLR v2, 0 = no head (the loss on h; SimCLR only, paper Fig. 8; the other --proj_* flags then do not apply)."
    )
    proj_dim: int = integer_field(128, "Output dimension of the projection head.")
    proj_batch_norm: str = enum_field(
        None, model_config.HEAD_BATCH_NORMS,
        "Head layers followed by BatchNorm (a bias where none is): all = SimCLR (default for simclr), hidden = "
        "the debiased/HCL reference code, none = MoCo v2's Linear-ReLU-Linear (default for moco_v2).",
    )  # fmt: skip
    proj_hidden_dim: int = integer_field(0, "Width of the head's hidden layers; 0: the width of h (official SimCLR).")
    objective_scale: float = float_field(
        None,
        "Optimised objective = this x the logged loss (the paper's L). Default: the reference code's, 2 for SimCLR "
        "(loss_a + loss_b) and symmetric MoCo (the sum of the two directions), 1 for asymmetric MoCo.",
    )
    method: str = enum_field("simclr", model_config.METHODS, "simclr, or moco_v2 (momentum key encoder and a queue of negatives).")
    temperature: float = float_field(0.5, "Contrastive temperature (SimCLR: 0.5 CIFAR, 0.1 ImageNet; MoCo v2: 0.2).")
    loss: str = enum_field("nt_xent", model_config.LOSSES, "nt_xent, or hard_negative (HCL; debiased with --hard_negative_beta=0).")
    hard_negative_beta: float = float_field(1.0, "HCL concentration beta on hard negatives (--loss=hard_negative).")
    debias_tau_plus: float = float_field(0.1, "Debiasing class prior tau_plus in [0, 1) (--loss=hard_negative).")
    moco_momentum: float = float_field(0.99, "MoCo key encoder momentum (0.99 CIFAR-scale, 0.999 ImageNet).")
    moco_queue_size: int = integer_field(4096, "MoCo queue of negatives (4096 CIFAR, 65536 ImageNet).")
    moco_symmetric: bool = bool_field(True, "MoCo symmetric loss: both views are queries and keys.")
    # moco_key_bn_splits: the spelling of earlier versions (then for the key encoder only), so that their flags.txt still parses.
    moco_bn_splits: int = integer_field(
        8, "MoCo: BatchNorm groups of each view's batch, query and (shuffled) key encoder alike (emulates per-device BN).",
        aliases=("moco_key_bn_splits",),
    )  # fmt: skip
    freeze_encoder: bool = bool_field(False, "Train only the online probe on a frozen, randomly initialised encoder (baseline).")
    # Augmentation
    color_jitter_strength: float = float_field(0.5, "Colour distortion strength s (0.5 for CIFAR, 1.0 for ImageNet).")
    color_jitter_probability: float = float_field(0.8, "Probability of applying the colour jitter to a view (0: never).")
    grayscale_probability: float = float_field(0.2, "Probability of turning a view to grayscale (the paper's colour drop).")
    flip_probability: float = float_field(0.5, "Probability of flipping a view horizontally.")
    crop_sampler: str = enum_field(
        "tensorflow", model_config.CROP_SAMPLERS,
        "Random crops: 'tensorflow' (tf.image.sample_distorted_bounding_box, the official code's) or 'torchvision' "
        "(RandomResizedCrop: area uniform, log-uniform aspect ratio, as lightly and solo-learn).",
    )  # fmt: skip
    min_crop_area: float = float_field(
        0.08, "Smallest random crop, as a fraction of the image's area (0.08: SimCLR, 0.2: MoCo v2); the largest is 1."
    )
    use_blur: bool = bool_field(False, "Gaussian blur (on for ImageNet and STL-10, off for CIFAR).")
    blur_padding: str = enum_field(
        "reflect", model_config.BLUR_PADDINGS,
        "Blur border: reflect (mirrored pixels) or zeros (the official code's 'SAME' convolution, darker borders).",
    )  # fmt: skip
    blur_sigma_per: str = enum_field(
        "image", model_config.BLUR_SIGMA_SCOPES,
        "Blur sigma drawn per image, or per batch: one for each view of a (per-replica) batch, as the official code.",
    )  # fmt: skip
    # Optimisation
    batch_size: int = integer_field(512, "Global batch size N (2N views per step).")
    micro_batch_size: int = integer_field(
        None,
        "SimCLR: encode M images (2M views) at a time, twice, for one exact step over the whole batch (gradient "
        "caching: large batches in little memory, ~1.3x the step time, BENCHMARKS.md); must divide the per-replica batch. Unset: one pass.",
    )
    train_epochs: int = integer_field(100, "Pretraining epochs.")
    train_steps: int = integer_field(0, "Pretraining steps; overrides train_epochs when > 0.")
    optimizer: str = enum_field(
        "lars", ("lars", "sgd", "adam", "adamw"), "Optimizer (adam: coupled L2 weight decay, as torch.optim.Adam)."
    )
    learning_rate: float = float_field(1.0, "Base learning rate, scaled by lr_scaling.")
    lr_scaling: str = enum_field("linear", ("linear", "sqrt"), "linear: lr*B/256; sqrt: lr*sqrt(B).")
    warmup_epochs: float = float_field(10, "Linear warm-up length in epochs, then the --lr_schedule.")
    lr_schedule: str = enum_field(
        "cosine", ("cosine", "constant"), "After the warm-up: cosine decay to 0 (SimCLR), or constant."
    )
    weight_decay: float = float_field(1e-4, "Weight decay (BatchNorm and bias variables excluded).")
    momentum: float = float_field(0.9, "Momentum of LARS and SGD.")
    nesterov: bool = bool_field(
        None, "optimizer=sgd: Nesterov momentum (the default: the official code's 'momentum' optimizer); --nonesterov: "
        "plain momentum, as torch.optim.SGD in MoCo. LARS keeps the official classic momentum.",
    )  # fmt: skip
    precision: str = enum_field(
        "float32", PRECISIONS,
        "Keras dtype policy; auto: mixed_bfloat16 on TPU and bfloat16 CPUs, mixed_float16 on GPU, else float32.",
    )  # fmt: skip
    # Distribution
    strategy: str = enum_field("default", STRATEGIES, "tf.distribute strategy; multi_worker reads TF_CONFIG.")
    tpu: str = string_field(None, "TPU address for --strategy=tpu (empty: the local TPU VM).")
    cpu_replicas: int = integer_field(0, "Split the host CPU into N logical devices (N >= 2) for mirrored/multi_worker on CPU.")
    global_bn: bool = bool_field(None, "Synchronized BatchNorm across replicas; default: on when there is more than one replica.")
    # Outputs
    model_dir: str = string_field(None, "Directory for checkpoints and logs; an existing run there is resumed.", required=True)
    checkpoint_every_n_steps: int = integer_field(500, "Checkpoint interval in steps (a checkpoint is also written at the end).")
    eval_batch_size: int = integer_field(500, "Batch size of the probe evaluation.")
    profile_steps: tuple = list_field((), "FIRST,LAST: record a TensorFlow profile of these global steps into MODEL_DIR/tensorboard.")
    export_dir: str = string_field(None, "If set, export the encoder for TF Serving to EXPORT_DIR/<next version> after training.")
    knn_every_n_epochs: int = integer_field(
        0, "Online kNN monitor: kNN top-1 of --knn_subset eval-split images every N epochs, logged; 0: off."
    )
    knn_subset: int = integer_field(1000, "Online kNN monitor: images of the eval split classified, against as many training images.")
    knn_memory: str = enum_field(
        "subset", ("subset", "train"), "Online kNN monitor's memory bank: subset (--knn_subset training images) or "
        "train (every labelled training image, up to --max_train_examples: the HCL/DCL references' monitor)."
    )
    knn_temperature: float = float_field(
        0.1, "Online kNN monitor: temperature T of the votes exp(similarity / T); the HCL/DCL references use 0.5."
    )

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_run_dir(cls, model_dir):
        """The settings a run was trained with (its MODEL_DIR/flags.txt), with model_dir set to `model_dir`.

        Raises FileNotFoundError when the directory holds no flags.txt.
        """
        path = os.path.join(model_dir, FLAGS_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model_dir={model_dir} is not a training run: {FLAGS_FILE} is missing.")
        return config_flags.read_flagfile(cls, path).replace(model_dir=model_dir)

    def flag_lines(self):
        """`--name=value` per setting that is not None: the content of a run's flags.txt, a --flagfile."""
        return config_flags.flag_lines(self)

    def model_config(self, num_classes=None, global_bn=False):
        """The ModelConfig of these settings, for `num_classes` probe classes and the resolved `global_bn`."""
        shared = {field.name for field in dataclasses.fields(model_config.ModelConfig)} - {"num_classes", "global_bn"}
        return model_config.ModelConfig(
            **{name: getattr(self, name) for name in shared}, num_classes=num_classes or None, global_bn=global_bn
        )

    def validate(self):
        """Every problem of these settings, one line each naming the field, the value and what is valid; [] if none.

        Checks what the settings alone decide; what needs the data or the devices (the number of images,
        of replicas) is checked by `pretrain`, before the first step.
        """
        problems = config_flags.type_problems(self)
        if problems:  # the range checks below assume the types
            return problems
        if self.model_dir is None:
            problems.append("model_dir must be set: the directory for checkpoints and logs.")
        for name in model_config.VALUE_RULES:
            if hasattr(self, name):
                problems.append(model_config.value_problem(name, getattr(self, name)))
        problems += self._optimisation_problems() + self._output_problems() + self._distribution_problems()
        return [problem for problem in problems if problem] + model_config.method_problems(self)

    def _optimisation_problems(self):
        problems = []
        if self.batch_size < 2:
            problems.append(f"batch_size must be >= 2 (NT-Xent needs negatives), got {self.batch_size}.")
        if not self.learning_rate > 0:
            problems.append(f"learning_rate must be > 0, got {self.learning_rate}.")
        for name in ("warmup_epochs", "weight_decay", "max_train_examples", "checkpoint_every_n_steps"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}.")
        if not 0 <= self.momentum < 1:
            problems.append(f"momentum must be in [0, 1), got {self.momentum}.")
        if self.nesterov is not None and self.optimizer != "sgd":
            problems.append(f"nesterov={self.nesterov} applies to optimizer=sgd, got optimizer={self.optimizer}.")
        if self.train_steps <= 0 and self.train_epochs <= 0:
            problems.append(
                f"train_steps={self.train_steps} and train_epochs={self.train_epochs}: set either to a positive number."
            )
        return problems

    def _output_problems(self):
        problems = []
        if self.eval_batch_size < 1:
            problems.append(f"eval_batch_size must be >= 1, got {self.eval_batch_size}.")
        steps = self.profile_steps
        if steps and not (
            len(steps) == 2 and all(step.isdigit() for step in steps) and 1 <= int(steps[0]) <= int(steps[1])
        ):
            problems.append(f"profile_steps takes FIRST,LAST global steps with 1 <= FIRST <= LAST, e.g. 5,8; got {','.join(steps)!r}.")
        if self.knn_every_n_epochs < 0:
            problems.append(f"knn_every_n_epochs must be >= 0, got {self.knn_every_n_epochs}.")
        if self.knn_subset < 1:
            problems.append(f"knn_subset must be >= 1, got {self.knn_subset}.")
        if not self.knn_temperature > 0:
            problems.append(f"knn_temperature must be > 0, got {self.knn_temperature}.")
        if self.knn_every_n_epochs and not self.eval_split:
            problems.append(
                f"knn_every_n_epochs={self.knn_every_n_epochs} classifies images of eval_split, which is empty; pass one."
            )
        return problems

    def _distribution_problems(self):
        problems = []
        if self.cpu_replicas < 0 or self.cpu_replicas == 1:
            problems.append(f"cpu_replicas must be 0 (off) or >= 2, got {self.cpu_replicas}.")
        elif self.cpu_replicas and self.strategy not in ("mirrored", "multi_worker"):
            problems.append(
                f"cpu_replicas={self.cpu_replicas} needs strategy=mirrored or multi_worker, got strategy={self.strategy}."
            )
        if self.strategy == "multi_worker" and "TF_CONFIG" not in os.environ:
            problems.append("strategy=multi_worker needs the TF_CONFIG environment variable (see docs/scaling.md).")
        return problems
