"""LightningModules."""

from lightning_tokens.modules.causal_lm import LoRASettings, OptimizerSettings, TokenLM
from lightning_tokens.modules.corda import CordaSettings
from lightning_tokens.modules.grao import GRAO
from lightning_tokens.modules.grpo import GRPO
from lightning_tokens.modules.image_generation import ImageCodeGenerator, generate_codes
from lightning_tokens.modules.image_tokenizer import FlexibleImageTokenizer
from lightning_tokens.modules.vision_language import ResamplerSettings, VisionLanguageLM, VisionSettings
from lightning_tokens.modules.vision_language_grpo import VisionLanguageGRPO
from lightning_tokens.modules.visual_tokenizer import VisualTokenizerDistillation

__all__ = [
    "CordaSettings",
    "FlexibleImageTokenizer",
    "GRAO",
    "ImageCodeGenerator",
    "GRPO",
    "LoRASettings",
    "OptimizerSettings",
    "ResamplerSettings",
    "TokenLM",
    "VisionLanguageGRPO",
    "VisionLanguageLM",
    "VisionSettings",
    "VisualTokenizerDistillation",
    "generate_codes",
]
