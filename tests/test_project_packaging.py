"""The package ships what it needs: every subpackage is listed in pyproject.toml, and the templates are inside."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from palpcompose.project import TEMPLATES

REPO = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "palpcompose").rglob("__init__.py")}
    assert on_disk | {"palpcompose.templates"} == listed, "update [tool.setuptools] packages in pyproject.toml"


def test_templates_are_complete():
    for name in TEMPLATES:
        for rel in ("palp.toml", "README.md", "refs/README.md"):
            assert (REPO / "templates" / name / rel).is_file(), f"templates/{name}/{rel}"


@pytest.mark.slow
def test_wheel_contains_the_templates(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "-w", str(tmp_path), "--no-deps", "-q"],
                   check=True)
    (wheel,) = tmp_path.glob("palpcompose-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in TEMPLATES:
        assert f"palpcompose/templates/{name}/palp.toml" in names
        assert f"palpcompose/templates/{name}/refs/README.md" in names
