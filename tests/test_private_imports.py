"""No module of t2i imports another module's private (`_name`) function: what is shared is public."""

from __future__ import annotations

import ast
from pathlib import Path

import t2i

KNOWN: set[tuple[str, str, str]] = set()  # (importing module, imported module, name) allowed: none


def private_imports() -> set[tuple[str, str, str]]:
    root = Path(t2i.__file__).parent
    found = set()
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("t2i"):
                found |= {(path.relative_to(root.parent).as_posix(), node.module, a.name) for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")}
    return found


def test_no_new_private_imports_across_modules():
    assert private_imports() - KNOWN == set()  # t2i.distill.cli imported train.cli's _parser and _run_plain


def test_the_training_cli_builders_are_public():
    from t2i.train import cli

    assert callable(cli.subparser) and callable(cli.run_plain)
