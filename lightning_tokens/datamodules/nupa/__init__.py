"""Number Cookbook (NUPA) tasks generated in code, as a LightningDataModule: task generation (:mod:`.tasks`), the
tokenized dataset and collator (:mod:`.dataset`) and :class:`NUPADataModule` (:mod:`.datamodule`)."""

from lightning_tokens.datamodules.nupa.datamodule import NUPADataModule
from lightning_tokens.datamodules.nupa.dataset import NUPACollator, NUPADataset
from lightning_tokens.datamodules.nupa.tasks import NUPA_TASKS, NUPAExample, generate_nupa_examples, iter_nupa_examples

__all__ = [
    "NUPA_TASKS",
    "NUPACollator",
    "NUPADataModule",
    "NUPADataset",
    "NUPAExample",
    "generate_nupa_examples",
    "iter_nupa_examples",
]
