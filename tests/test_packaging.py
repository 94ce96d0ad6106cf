"""Every Python package in the source tree is listed in pyproject.toml (a wheel would miss it otherwise)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = {name: ROOT / path for name, path in config.get("package-dir", {}).items()}
    roots.setdefault("pbtvm", ROOT / "pbtvm")
    found = set()
    for name, path in roots.items():
        for init in path.rglob("__init__.py"):
            rel = init.parent.relative_to(path).parts
            found.add(".".join((name, *rel)))
    assert found == set(config["packages"]), (
        f"pyproject packages differ from the tree: {sorted(found ^ set(config['packages']))}"
    )
