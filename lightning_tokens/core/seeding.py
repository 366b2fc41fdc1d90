"""One seed for a whole run: datamodules take ``seed_everything``'s seed unless given their own."""

from __future__ import annotations

import os
from typing import Any

#: The seed of a datamodule when neither its ``seed`` nor ``seed_everything`` says otherwise.
DEFAULT_SEED = 1234


def global_seed(default: int = DEFAULT_SEED) -> int:
    """The seed ``lightning.seed_everything`` set in this process (Lightning keeps it in
    ``PL_GLOBAL_SEED``, which also reaches the processes it launches), else ``default``.

    Example:
        >>> import lightning.pytorch as pl
        >>> _ = pl.seed_everything(7, verbose=False)
        >>> global_seed()
        7
    """
    value = os.environ.get("PL_GLOBAL_SEED", "")
    return int(value) if value.strip() else default


class SeedOption:
    """A ``seed`` attribute that is read when used: the value given (an ``int``), or for ``None`` the seed
    of ``seed_everything`` at the time of reading (see :func:`global_seed`).

    Datamodules read their seed in ``setup`` and the dataloaders, after the CLI (or the user) has called
    ``seed_everything``, so ``--seed_everything 2`` changes the generated data and the shuffling of every
    datamodule that was not given a ``seed`` of its own.

    Example:
        >>> class Data:
        ...     seed = SeedOption()
        ...     def __init__(self, seed=None):
        ...         self.seed = seed
        >>> Data(seed=3).seed
        3
        >>> import lightning.pytorch as pl
        >>> _ = pl.seed_everything(11, verbose=False)
        >>> Data().seed
        11
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self._slot = f"_{name}_given"

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        given = obj.__dict__.get(self._slot)
        return int(given) if given is not None else global_seed()

    def __set__(self, obj: Any, value: int | None) -> None:
        obj.__dict__[self._slot] = value
