"""Validation of string options shared by every method: one message format, naming the owner, the field
and the choices."""

from __future__ import annotations

from lightning_tokens.core.errors import ConfigError

__all__ = ["check_choice"]


def check_choice(owner: str, name: str, value: object, choices: tuple[str, ...], hint: str = "") -> None:
    """Fail early when ``value`` is not one of ``choices`` (a ``Literal`` option given from YAML or code).

    Args:
        owner: the class or function taking the option, as the user wrote it (``QTuning``).
        name: the option's name.
        value: what was given.
        choices: the allowed values.
        hint: optional text appended to the message (what the choices mean).

    Example:
        >>> check_choice("ExcessLossSelection", "scope", "rows", ("batch", "sample"))
        Traceback (most recent call last):
        ...
        lightning_tokens.core.errors.ConfigError: ExcessLossSelection(scope='rows'): scope must be one of 'batch', 'sample'.
    """
    if value not in choices:
        raise ConfigError(f"{owner}({name}={value!r}): {name} must be one of {', '.join(map(repr, choices))}{hint}.")
