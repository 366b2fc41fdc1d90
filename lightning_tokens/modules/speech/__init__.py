"""Speech as tokens: the USTokenizer (:class:`SpeechTokenizer`) and :class:`DualSpeechLM`."""

from lightning_tokens.layers.prefix_lm import prefix_lm_mask
from lightning_tokens.modules.speech.dual_lm import AcousticSettings, DualSpeechLM, SpeechSampling
from lightning_tokens.modules.speech.tokenizer import SpeechTokenizer, tokenizer_loss

__all__ = ["AcousticSettings", "DualSpeechLM", "SpeechSampling", "SpeechTokenizer", "prefix_lm_mask", "tokenizer_loss"]
