"""What ``lightning-tokens compare`` runs: variants (a name, the token methods, extra options) and the
registry of the library's methods by short name."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_tokens.core.errors import ConfigError, MissingFileError

#: Short names of the library's methods for ``--methods``, each with its default arguments. ``rho1`` and
#: ``sstoken`` need the base config's model to have a ``reference`` (e.g. ``mode: adapter_disabled`` with LoRA).
METHODS: dict[str, list[dict[str, Any]]] = {
    "none": [],
    "dft": [{"class_path": "lightning_tokens.callbacks.DFT"}],
    "rho1": [{"class_path": "lightning_tokens.callbacks.ExcessLossSelection"}],
    "sstoken": [{"class_path": "lightning_tokens.callbacks.SSToken"}],
    "qtuning": [{"class_path": "lightning_tokens.callbacks.QTuning"}],
    "ift": [{"class_path": "lightning_tokens.callbacks.IntuitiveFineTuning"}],
    "otr": [{"class_path": "lightning_tokens.callbacks.OneTokenRollout"}],
}

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class Variant:
    """One arm of a comparison.

    Args:
        name: the row name in the table and the run's folder name.
        callbacks: the token methods, as ``{class_path, init_args}`` entries (they replace the base
            config's token methods; its other callbacks stay).
        args: command-line options for this variant only, e.g. ``["--model.init_args.optimizer.lr=1e-4"]``.

    Example:
        >>> Variant("dft", [{"class_path": "lightning_tokens.callbacks.DFT"}]).name
        'dft'
    """

    name: str
    callbacks: list[dict[str, Any]] = field(default_factory=list)
    args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not _SAFE_NAME.match(self.name):
            raise ConfigError(
                f"variant name {self.name!r} must start with a letter or digit and use only letters, digits and "
                "_ . + - (it names the run's folder)."
            )


def parse_methods(spec: str) -> list[Variant]:
    """Variants from ``--methods``: comma-separated short names from :data:`METHODS` or class paths.

    Example:
        >>> [v.name for v in parse_methods("none, dft,lightning_tokens.callbacks.SSToken")]
        ['none', 'dft', 'SSToken']
    """
    variants = []
    for token in (part.strip() for part in spec.split(",")):
        if not token:
            continue
        if token in METHODS:
            variants.append(Variant(token, [dict(entry) for entry in METHODS[token]]))
        elif "." in token:
            variants.append(Variant(token.rsplit(".", 1)[1], [{"class_path": token}]))
        else:
            raise ConfigError(
                f"--methods: {token!r} is not a known method; use one of {sorted(METHODS)}, a class path such "
                "as lightning_tokens.callbacks.DFT, or --variants FILE for methods with arguments."
            )
    return _checked(variants, "--methods")


def load_variants(path: str | Path) -> list[Variant]:
    """Variants from a YAML list; each item has a ``name``, ``methods`` (a short name, a
    ``{class_path, init_args}`` entry, or a list of them; omitted = no method) and optional ``args`` (a
    list of command-line options) or ``overrides`` (a mapping of option to value).

    Example file::

        - name: ce
        - name: dft-floor
          methods: {class_path: lightning_tokens.callbacks.DFT, init_args: {min_weight: 0.25}}
        - name: rho1-0.3
          methods: [{class_path: lightning_tokens.callbacks.ExcessLossSelection, init_args: {ratio: 0.3}}]
          overrides: {model.init_args.optimizer.lr: 0.0001}
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"--variants: {path} does not exist.")
    items = yaml.safe_load(path.read_text())
    if not isinstance(items, list) or not items:
        raise ConfigError(f"--variants: {path} must hold a non-empty YAML list of variants (name, methods, args).")
    variants = []
    for index, item in enumerate(items):
        where = f"--variants {path}, item {index}"
        if not isinstance(item, dict) or "name" not in item:
            raise ConfigError(f"{where}: each variant is a mapping with at least a `name`.")
        unknown = set(item) - {"name", "methods", "args", "overrides"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; use name, methods, args, overrides.")
        args = [str(arg) for arg in item.get("args") or []]
        args += [f"--{key}={_option_value(value)}" for key, value in (item.get("overrides") or {}).items()]
        variants.append(Variant(str(item["name"]), _method_entries(item.get("methods"), where), args))
    return _checked(variants, f"--variants {path}")


def _method_entries(methods: Any, where: str) -> list[dict[str, Any]]:
    if methods is None:
        return []
    entries = []
    for method in methods if isinstance(methods, list) else [methods]:
        if isinstance(method, str) and method in METHODS:
            entries.extend(dict(entry) for entry in METHODS[method])
        elif isinstance(method, str) and "." in method:
            entries.append({"class_path": method})
        elif isinstance(method, dict) and isinstance(method.get("class_path"), str):
            entries.append({"class_path": method["class_path"], "init_args": dict(method.get("init_args") or {})})
        else:
            raise ConfigError(
                f"{where}: method {method!r} is neither a short name ({sorted(METHODS)}) nor a class path nor a "
                "{class_path, init_args} mapping."
            )
    return entries


def _option_value(value: Any) -> str:
    return value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _checked(variants: list[Variant], where: str) -> list[Variant]:
    if not variants:
        raise ConfigError(f"{where}: no variants given.")
    names = [v.name for v in variants]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"{where}: variant names must be unique; repeated: {duplicates} (name them in a --variants file).")
    return variants
