"""Building blocks shared by several modules: the Perceiver resampler, the prefix-LM acoustic GPT."""

from lightning_tokens.layers.prefix_lm import AcousticGPT, AcousticVocabulary, Adapter, prefix_lm_mask
from lightning_tokens.layers.resampler import PerceiverResampler

__all__ = ["AcousticGPT", "AcousticVocabulary", "Adapter", "PerceiverResampler", "prefix_lm_mask"]
