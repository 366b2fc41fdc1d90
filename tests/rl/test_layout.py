"""`lightning_tokens.rl` is pure arithmetic: torch and the library's error types, nothing above."""

import ast
import subprocess
import sys
from pathlib import Path

import lightning_tokens.rl

PACKAGE = Path(lightning_tokens.rl.__file__).parent
ALLOWED = {"__future__", "collections.abc", "dataclasses", "math", "typing", "torch", "lightning_tokens.core.errors"}


def test_rl_imports_only_torch_and_the_error_types():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            for name in names:
                if name not in ALLOWED and not name.startswith("lightning_tokens.rl"):
                    offenders.append(f"{path.name} imports {name}")
    assert not offenders, offenders


def test_importing_rl_leaves_lightning_unloaded():
    code = (
        "import sys, lightning_tokens.rl; print(sorted(m for m in ('lightning', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"
