"""The package map in ``enforcer/__init__.py`` and the package docstrings name every module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import enforcer

ROOT = Path(enforcer.__file__).parent


def _doc(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text())) or ""


def test_the_map_names_every_top_level_module_and_package() -> None:
    """Every top-level module and package of ``enforcer`` appears in the map docstring."""
    doc = _doc(ROOT / "__init__.py")
    names = {p.stem for p in ROOT.glob("*.py") if not p.stem.startswith("__")}
    names |= {p.parent.name for p in ROOT.glob("*/__init__.py")}
    missing = sorted(n for n in names if f"``{n}" not in doc and f"{n}``" not in doc and f"``{n}.`" not in doc)
    assert not missing, f"enforcer/__init__.py does not name: {missing}"


def test_every_package_docstring_names_each_of_its_modules() -> None:
    """A package's ``__init__`` docstring names each module in it, so ``ls`` and the docs agree."""
    missing = []
    for init in sorted(ROOT.glob("*/__init__.py")):
        doc = _doc(init)
        for module in sorted(init.parent.glob("*.py")):
            if module.stem != "__init__" and f"``{module.stem}``" not in doc:
                missing.append(f"{init.parent.name}.{module.stem}")
    assert not missing, f"not named in their package docstring: {missing}"


def test_the_map_points_only_at_modules_that_exist() -> None:
    """Each dotted ``package.module`` in the map is a real file."""
    doc = _doc(ROOT / "__init__.py")
    dotted = {m for m in re.findall(r"``([a-z_.]+)``", doc) if "." in m}
    assert dotted
    for name in dotted:
        assert (ROOT / (name.replace(".", "/") + ".py")).exists(), name
