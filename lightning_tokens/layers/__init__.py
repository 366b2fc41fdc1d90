"""Building blocks shared by several modules: the Perceiver resampler, the prefix-LM acoustic GPT, the PatchGAN
adversarial loss."""

from lightning_tokens.layers.adversarial import (
    AdversarialSettings,
    PatchDiscriminator,
    adaptive_adversarial_weight,
    hinge_discriminator_loss,
    hinge_generator_loss,
)
from lightning_tokens.layers.prefix_lm import AcousticGPT, AcousticVocabulary, Adapter, prefix_lm_mask
from lightning_tokens.layers.resampler import PerceiverResampler

__all__ = [
    "AcousticGPT",
    "AcousticVocabulary",
    "Adapter",
    "AdversarialSettings",
    "PatchDiscriminator",
    "PerceiverResampler",
    "adaptive_adversarial_weight",
    "hinge_discriminator_loss",
    "hinge_generator_loss",
    "prefix_lm_mask",
]
