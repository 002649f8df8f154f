"""SimCLR: both views through one encoder and head, NT-Xent (or its hard-negative variant) on them."""

import keras
import tensorflow as tf

from simclr_keras import losses, model_config
from simclr_keras.models import gradient_cache
from simclr_keras.models.contrastive import ContrastiveModel

CONTRASTIVE_LOSSES = model_config.LOSSES


@keras.saving.register_keras_serializable(package="simclr_keras")
class SimCLR(ContrastiveModel):
    """SimCLR pretraining (Chen et al., ICML 2020, arXiv:2002.05709).

    Both views go through the encoder f in one pass, so BatchNorm sees the 2N images together (as the
    official code does), then through the projection head g; NT-Xent on the projections is the loss,
    with negatives from every replica under tf.distribute. The online probe, logging and evaluation
    are `ContrastiveModel`'s (see its docstring for the arguments shared with MoCo).

    Args:
      loss: "nt_xent" (the paper's loss) or "hard_negative" (`losses.hard_negative_nt_xent`: HCL,
        Robinson et al. 2021; with hard_negative_beta=0 the debiased loss of Chuang et al. 2020).
      hard_negative_beta, debias_tau_plus: beta and tau_plus of the "hard_negative" loss.
      micro_batch_size: None (one pass over the 2N views), or M images: each step encodes both views
        of M images at a time, twice, and takes one exact step over the whole batch
        (`models.gradient_cache`; M must divide the per-replica batch). BatchNorm then normalises each
        micro-batch of 2M views with its own statistics, and updates its moving ones once per micro-batch.
      objective_scale: the optimised objective is objective_scale x the logged loss; 2 (default) is
        the official code's loss_a + loss_b (`objective.add_contrastive_loss`), twice the paper's L,
        which the logs report. The recipes' learning rates and weight decays were tuned for it.
      **kwargs: `ContrastiveModel`'s (encoder, projection_head, augmenter, temperature, num_classes,
        freeze_encoder, synchronized_batch_norm) and keras.Model's.
    """

    def __init__(
        self,
        *args,
        loss="nt_xent",
        hard_negative_beta=1.0,
        debias_tau_plus=0.1,
        micro_batch_size=None,
        objective_scale=2.0,
        **kwargs,
    ):
        if loss not in CONTRASTIVE_LOSSES:
            raise ValueError(f"loss must be one of {list(CONTRASTIVE_LOSSES)}, got {loss!r}.")
        losses.check_hard_negative_arguments(hard_negative_beta, debias_tau_plus)
        gradient_cache.check_micro_batch_size(micro_batch_size)
        super().__init__(*args, objective_scale=objective_scale, **kwargs)
        self.loss_name = loss
        self.hard_negative_beta = float(hard_negative_beta)
        self.debias_tau_plus = float(debias_tau_plus)
        self.micro_batch_size = micro_batch_size

    def train_step(self, data):
        if self.micro_batch_size is None:
            return super().train_step(data)
        return gradient_cache.micro_batched_train_step(self, data)

    def contrastive_forward(self, view1, view2):
        batch_size = tf.shape(view1)[0]
        representation = self.encoder(tf.concat([view1, view2], axis=0), training=True)  # (2N, D)
        projection = self.projection_head(representation, training=True)  # (2N, proj_dim)
        loss, accuracy = self.contrastive_loss(projection[:batch_size], projection[batch_size:])
        return loss, accuracy, representation, None

    def contrastive_loss(self, z1, z2):
        """(loss, contrastive accuracy) of the two views' projections, [N, proj_dim] each.

        The one place the SimCLR loss is computed: the plain and the micro-batched step both call it.
        """
        if self.loss_name == "hard_negative":
            return losses.hard_negative_nt_xent_with_accuracy(
                z1, z2, self.temperature, self.hard_negative_beta, self.debias_tau_plus
            )
        return losses.nt_xent_with_accuracy(z1, z2, self.temperature)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "loss": self.loss_name,
                "hard_negative_beta": self.hard_negative_beta,
                "debias_tau_plus": self.debias_tau_plus,
                "micro_batch_size": self.micro_batch_size,
            }
        )
        return config


def build_simclr(config=None, **settings):
    """A SimCLR model from a `ModelConfig` (`simclr_keras.model_config`), or from its fields as keywords.

        build_simclr(ModelConfig(width_multiplier=0.5, proj_layers=3))
        build_simclr(width_multiplier=0.5, proj_layers=3)  # the same model

    Keywords update `config` (default: `ModelConfig()`). `objective_scale=None` is SimCLR's default,
    the official objective (2 x the logged loss). The old keyword `synchronized_batch_norm` still
    works (deprecated; it is `global_bn`).
    """
    config = model_config.model_config_from_settings(
        config, settings, "simclr", renamed={"synchronized_batch_norm": "global_bn"}
    )
    encoder, head, augmenter = model_config.build_components(config)
    return SimCLR(
        encoder=encoder,
        projection_head=head,
        augmenter=augmenter,
        temperature=config.resolved_temperature,
        num_classes=config.num_classes,
        freeze_encoder=config.freeze_encoder,
        synchronized_batch_norm=config.global_bn,
        loss=config.loss,
        hard_negative_beta=config.hard_negative_beta,
        debias_tau_plus=config.debias_tau_plus,
        micro_batch_size=config.micro_batch_size,
        objective_scale=2.0 if config.objective_scale is None else config.objective_scale,
        name="simclr",
    )
