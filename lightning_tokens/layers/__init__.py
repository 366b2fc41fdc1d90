"""Building blocks shared by several modules (the Perceiver resampler; more as modalities arrive)."""

from lightning_tokens.layers.resampler import PerceiverResampler

__all__ = ["PerceiverResampler"]
