"""Outputs of a frozen network per waveform, kept in memory so that later epochs skip the network."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from lightning_tokens.core.errors import ConfigError


class WaveformCache:
    """A frozen network's output for each waveform it has seen, keyed by the waveform's length and bytes (so
    the same audio hits whatever batch, order or padding it comes in), stored on the CPU, up to ``capacity``
    entries (later ones are computed every time). ``capacity`` 0 caches nothing.

    Example:
        >>> import numpy as np, torch
        >>> cache, calls = WaveformCache(8), []
        >>> def double(waves):
        ...     calls.append(len(waves))
        ...     return [torch.as_tensor(w) * 2 for w in waves]
        >>> a, b = np.ones(3, dtype="float32"), np.zeros(2, dtype="float32")
        >>> [t.tolist() for t in cache.map([a, b], double)], [t.tolist() for t in cache.map([b, a], double)], calls
        ([[2.0, 2.0, 2.0], [0.0, 0.0]], [[0.0, 0.0], [2.0, 2.0, 2.0]], [2])
    """

    def __init__(self, capacity: int, owner: str = "feature_cache_size") -> None:
        if capacity < 0:
            raise ConfigError(f"{owner}={capacity}: must be >= 0 (0: no cache).")
        self.capacity = int(capacity)
        self._entries: dict[tuple[int, int], Any] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def map(self, waves: Sequence[Any], compute: Callable[[list[Any]], list[Any]]) -> list[Any]:
        """``compute(waves)`` element by element, running ``compute`` once on the waveforms not cached.

        Args:
            waves: numpy arrays (or anything with ``tobytes``), one per utterance.
            compute: the frozen network on a list of waveforms, one output per waveform.
        """
        keys = [(len(wave), hash(wave.tobytes())) for wave in waves] if self.capacity else [None] * len(waves)
        outputs: list[Any] = [self._entries.get(key) if key is not None else None for key in keys]
        missing = [i for i, out in enumerate(outputs) if out is None]
        if missing:
            for i, out in zip(missing, compute([waves[i] for i in missing])):
                outputs[i] = out
                if keys[i] is not None and len(self._entries) < self.capacity:
                    self._entries[keys[i]] = out.cpu() if isinstance(out, Tensor) else out
        return outputs
