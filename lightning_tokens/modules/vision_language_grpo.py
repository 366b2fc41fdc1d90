"""``VisionLanguageGRPO``: group-relative policy optimisation of a vision-language model.

:class:`~lightning_tokens.modules.grpo.GRPO`'s rollouts and objective on a
:class:`~lightning_tokens.modules.vision_language.VisionLanguageLM`: each prompt's image rides along with its
``num_generations`` samples (:meth:`VisionLanguageLM.repeat_prompts`) and with the training rows built from
them (:meth:`VisionLanguageLM.rollout_inputs`), so both the GVT composition and Hugging Face VLMs (Qwen2-VL...)
train on their own completions with the fused token loss, references and token methods as in text GRPO.
TimeMaster (plots of time series → ``<think>``/``<class>`` answers) is its first user.

Example::

    model = VisionLanguageGRPO(
        model="runs/timemaster_sft/export", rewards=[RewardSpec("lightning_tokens.rewards.timemaster.TimeMasterReward")],
        num_generations=5, beta=0.01, reference=ReferenceSettings(mode="ema"),
    )
    trainer = L.Trainer(max_steps=100)
    trainer.fit(model, datamodule=TimeSeriesDataModule(dataset="GunPoint"))
"""

from __future__ import annotations

from typing_extensions import override

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.modules.grpo import GRPO
from lightning_tokens.modules.rollout_engines import RolloutEngine
from lightning_tokens.modules.vision_language import VisionLanguageLM

__all__ = ["VisionLanguageGRPO"]


class VisionLanguageGRPO(GRPO, VisionLanguageLM):
    """GRPO on a :class:`VisionLanguageLM`: the arguments of both (``rewards``, ``num_generations``, ``beta``...
    and ``model``, ``vision``, ``resampler``, ``lora``...). Generation uses the module itself
    (``generation_backend: hf``): the vLLM engine is text-only here.
    """

    @override
    def build_rollout_engine(self) -> RolloutEngine:
        raise ConfigError(
            "VisionLanguageGRPO generates with the module itself: set generation_backend: hf (the vLLM engine "
            "here feeds token ids only, not images)."
        )
