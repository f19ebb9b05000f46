"""DESIGN.md's layering: engine and models import no device or UI framework."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_hold():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not Path(exe).exists():
        pytest.fail("import-linter is not installed (it is in the `test` extra)")
    res = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def test_engine_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import localserve.engine.scheduler, localserve.engine.llm_engine, localserve.models.loader\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_every_package_in_the_tree_is_packaged():
    """A plain (non-editable) `pip install .` ships exactly the packages pyproject lists."""
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = {name: ROOT / path for name, path in setup["package-dir"].items()}
    on_disk = set()
    for name, path in dirs.items():
        for init in path.rglob("__init__.py"):
            rel = init.parent.relative_to(path).parts
            on_disk.add(".".join((name, *rel)))
    assert on_disk == set(setup["packages"])
