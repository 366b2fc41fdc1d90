"""LightningModules."""

from lightning_tokens.modules.causal_lm import LoRASettings, OptimizerSettings, TokenLM
from lightning_tokens.modules.grpo import GRPO

__all__ = ["GRPO", "LoRASettings", "OptimizerSettings", "TokenLM"]
