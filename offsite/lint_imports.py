"""Check the import contracts of `pyproject.toml` ([tool.importlinter]) with import-linter.

    python -m offsite.lint_imports      # what `make lint` and `make test` run

The distribution maps folders to subpackages (`client/` is `offsite.client`, see
[tool.setuptools.package-dir]), and grimp, import-linter's graph builder, only walks the root
package's own directory. So the sources are copied into one `offsite/` tree in a temporary
directory, the editable install's finder is set aside, and import-linter reads that tree.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip's vendored copy of the same parser
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"


def _layout() -> dict[str, str]:
    """Subpackage -> folder, from setuptools' package-dir table (only `offsite.x` entries)."""
    mapping = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["package-dir"]
    return {name.split(".", 1)[1]: folder for name, folder in mapping.items() if name.count(".") == 1}


def main() -> int:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    with tempfile.TemporaryDirectory(prefix="offsite-imports-") as tmp:
        pkg = Path(tmp) / "offsite"
        shutil.copytree(ROOT / "offsite", pkg, ignore=ignore)
        for sub, folder in _layout().items():
            shutil.copytree(ROOT / folder, pkg / sub, ignore=ignore)
        sys.meta_path[:] = [
            f
            for f in sys.meta_path
            if "__editable__" not in getattr(f, "__module__", "") and "__editable__" not in type(f).__module__
        ]
        for name in [m for m in sys.modules if m == "offsite" or m.startswith("offsite.")]:
            del sys.modules[name]
        sys.path.insert(0, tmp)
        os.chdir(tmp)  # import-linter puts the working directory first on sys.path
        from importlinter.cli import lint_imports

        return lint_imports(config_filename=str(PYPROJECT), no_cache=True)


if __name__ == "__main__":
    sys.exit(main())
