"""LightningDataModules: SFT data, Number Cookbook (NUPA) tasks, ..."""

from lightning_tokens.datamodules.nupa import (
    NUPA_TASKS,
    NUPACollator,
    NUPADataModule,
    NUPADataset,
    NUPAExample,
    generate_nupa_examples,
    iter_nupa_examples,
)

__all__ = [
    "NUPA_TASKS",
    "NUPACollator",
    "NUPADataModule",
    "NUPADataset",
    "NUPAExample",
    "generate_nupa_examples",
    "iter_nupa_examples",
]
