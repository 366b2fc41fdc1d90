"""LightningModules."""

from lightning_tokens.modules.causal_lm import LoRASettings, OptimizerSettings, TokenLM

__all__ = ["LoRASettings", "OptimizerSettings", "TokenLM"]
