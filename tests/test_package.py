"""The package's layout rules (DESIGN.md, "Where things go") and the old import paths of moved modules."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_tokens

PACKAGE = Path(lightning_tokens.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer, allowed", [("ops", ("ops",)), ("core", ("core", "ops"))])
def test_lower_layers_never_import_the_upper_ones(layer, allowed):
    """ops and core know nothing of modules, callbacks, datamodules, models: a module joins the pipeline
    through the mixin and the `ReferenceHost` protocol, not because core knows it."""
    offenders = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for name in _imported_modules(path):
            if name == "lightning_tokens":
                continue  # `from lightning_tokens import ops`
            if name.startswith("lightning_tokens.") and name.split(".")[1] not in allowed:
                offenders.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not offenders, offenders


def test_no_loose_top_level_modules():
    """Every file has a role folder (the command line included: ``cli/``); only the package root sits at the top."""
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert loose == ["__init__.py"], loose


@pytest.mark.parametrize("old, new", sorted(lightning_tokens.MOVED_MODULES.items()))
def test_a_moved_module_keeps_its_old_import_path(old, new):
    """A fresh interpreter: the old path is the same module object as the new one (classes keep their
    identity, so YAML `class_path` entries written before the move still work), with a warning."""
    code = (
        "import importlib, warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    old = importlib.import_module({old!r})\n"
        f"new = importlib.import_module({new!r})\n"
        "assert old is new and new.__spec__.name == new.__name__, (old, new.__spec__)\n"
        f"assert any('moved to {new}' in str(w.message) for w in caught), [str(w.message) for w in caught]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_old_class_path_builds_the_same_class():
    from jsonargparse import ArgumentParser

    from lightning_tokens.models.guardrails import CausalLMGuardrail, Guardrail

    parser = ArgumentParser()
    parser.add_argument("--guardrail", type=Guardrail)
    config = parser.parse_args(["--guardrail", '{"class_path": "lightning_tokens.guardrails.CausalLMGuardrail", "init_args": {"model": "x"}}'])
    assert parser.instantiate(config).guardrail.__class__ is CausalLMGuardrail
    assert importlib.import_module("lightning_tokens.guardrails") is importlib.import_module("lightning_tokens.models.guardrails")
