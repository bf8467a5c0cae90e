"""The import contracts of pyproject.toml ([tool.importlinter]) hold, and every subpackage is installed.

import-linter finds a package's modules by walking its folder. The editable install maps the top-level
folders (edge/, models/, ...) onto ``latentcast.*`` with an import hook it does not see, so the check
runs on a staging tree laid out as a normal install is: ``latentcast/<subpackage>/`` with links to the
``.py`` files of exactly the packages pyproject.toml lists.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _package_folder(name: str, package_dir: dict[str, str]) -> Path:
    """The source folder of package ``name`` under the ``package-dir`` mapping (longest mapped prefix)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in package_dir:
            return ROOT / package_dir[prefix] / Path(*parts[i:])
    raise AssertionError(f"package {name!r} has no package-dir entry")


def _stage_install(dest: Path) -> None:
    setup = _setuptools()
    for name in setup["packages"]:
        src = _package_folder(name, setup["package-dir"])
        target = dest / Path(*name.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for f in src.glob("*.py"):
            (target / f.name).symlink_to(f)


def test_every_subpackage_is_listed_for_install():
    setup = _setuptools()
    listed = set(setup["packages"])
    missing = []
    for name in setup["package-dir"]:
        folder = _package_folder(name, setup["package-dir"])
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder)
            sub = ".".join([name, *rel.parts])
            if sub not in listed and "__pycache__" not in rel.parts:
                missing.append(sub)
    assert not missing, f"packages with an __init__.py missing from [tool.setuptools] packages: {missing}"


def test_import_contracts(tmp_path):
    pytest.importorskip("importlinter")
    _stage_install(tmp_path / "site")
    code = textwrap.dedent(f"""
        import sys
        from importlinter.cli import lint_imports
        sys.exit(lint_imports(config_filename={str(ROOT / "pyproject.toml")!r}, no_cache=True, no_logo=True))
    """)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env=env)
    assert res.returncode == 0, f"import contracts broken:\n{res.stdout}\n{res.stderr}"
