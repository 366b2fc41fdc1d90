"""The ``lightning-tokens`` command: Lightning's CLI over every module and datamodule of the library.

    lightning-tokens fit --config configs/quickstart.yaml
    lightning-tokens validate --config configs/quickstart.yaml --ckpt_path runs/quickstart/checkpoints/last.ckpt
    lightning-tokens predict --config configs/quickstart.yaml --ckpt_path ... --predictions.output answers.jsonl
    lightning-tokens score --config reference.yaml --output reference_scores.safetensors
    lightning-tokens generic_labels --config configs/whp_generic_labels.yaml --output generic.safetensors
    lightning-tokens export --config configs/fsdp.yaml --ckpt_path runs/fsdp/checkpoints/last.ckpt --output export/
    lightning-tokens star_score --config configs/star_dss.yaml --guardrail '{class_path: ..., init_args: ...}' --output v.safetensors
    lightning-tokens compare --config configs/compare_smollm2_nupa.yaml --methods none,dft,rho1 --seeds 1,2

Every subcommand takes ``--output_dir DIR``: the run's root, logs and checkpoints together.
"""

from lightning_tokens.cli.app import DEBUG_ENV, TokensCLI, cli, main
from lightning_tokens.cli.config_edits import apply_output_dir, replace_token_methods
from lightning_tokens.cli.messages import (
    KNOWN_THIRD_PARTY_LOG_LINES,
    KNOWN_THIRD_PARTY_WARNINGS,
    silence_known_third_party_messages,
)
from lightning_tokens.cli.offline_steps import attach_to_trainer, trainer_generic_labels, trainer_score, trainer_star_score
from lightning_tokens.cli.trainer import TokensTrainer

__all__ = [
    "DEBUG_ENV",
    "KNOWN_THIRD_PARTY_LOG_LINES",
    "KNOWN_THIRD_PARTY_WARNINGS",
    "TokensCLI",
    "TokensTrainer",
    "apply_output_dir",
    "attach_to_trainer",
    "cli",
    "main",
    "replace_token_methods",
    "silence_known_third_party_messages",
    "trainer_generic_labels",
    "trainer_score",
    "trainer_star_score",
]
