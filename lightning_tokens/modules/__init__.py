"""LightningModules."""

from lightning_tokens.modules.causal_lm import LoRASettings, OptimizerSettings, TokenLM
from lightning_tokens.modules.grao import GRAO
from lightning_tokens.modules.grpo import GRPO

__all__ = ["GRAO", "GRPO", "LoRASettings", "OptimizerSettings", "TokenLM"]
