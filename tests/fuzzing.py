"""Shared pieces of the fuzz tests of user-file readers (``test_*_fuzz.py``).

Budgets are small so that CI stays fast; ``HYPOTHESIS_PROFILE=fuzz`` (registered in ``tests/conftest.py``)
multiplies every budget by 20, e.g. ``HYPOTHESIS_PROFILE=fuzz pytest tests/datamodules/test_sft_fuzz.py``.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings


def budget(examples: int) -> int:
    """``examples`` scaled by the active profile (``ci``: as given; ``fuzz``: 20 times)."""
    return max(1, examples * settings.default.max_examples // 100)


def fuzz(examples: int) -> settings:
    """The settings of a fuzz test: ``budget(examples)`` examples, no deadline (CI machines are slow)."""
    return settings(
        max_examples=budget(examples),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )
