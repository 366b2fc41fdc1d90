"""Classical baselines that token methods are compared with, on the same splits as the datamodules give."""

from lightning_tokens.baselines.time_series import CLASSICAL_BASELINES, classical_baselines

__all__ = ["CLASSICAL_BASELINES", "classical_baselines"]
