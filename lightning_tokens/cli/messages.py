"""Known messages of other libraries that the ``lightning-tokens`` command silences."""

from __future__ import annotations

from typing import Any

#: Messages of other libraries that every run prints and the library cannot fix at the source; the
#: ``lightning-tokens`` command silences them (``import lightning_tokens`` does not touch warning filters).
#: Warnings: (message regex, category, origin). Log lines: (logger name, message prefix, origin).
KNOWN_THIRD_PARTY_WARNINGS: list[tuple[str, type[Warning], str]] = [
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, "Lightning 2.6's _pytree under torch 2.14"),
]
KNOWN_THIRD_PARTY_LOG_LINES: list[tuple[str, str, str]] = [
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip: For seamless cloud logging", "Lightning's LitLogger advert"),
]


def silence_known_third_party_messages() -> None:
    """Install the filters of :data:`KNOWN_THIRD_PARTY_WARNINGS` and :data:`KNOWN_THIRD_PARTY_LOG_LINES`."""
    import logging
    import warnings

    for message, category, _ in KNOWN_THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, prefix, _ in KNOWN_THIRD_PARTY_LOG_LINES:
        logger = logging.getLogger(name)
        if not any(getattr(f, "prefix", None) == prefix for f in logger.filters):
            logger.addFilter(_DropPrefix(prefix))


class _DropPrefix:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def filter(self, record: Any) -> bool:
        return not str(record.getMessage()).startswith(self.prefix)
