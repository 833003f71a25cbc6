"""The package ships its templates (as palpcompose.templates), in an editable install and in the wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from palpcompose.project import TEMPLATES

REPO = Path(__file__).resolve().parents[1]


def test_templates_ship_as_a_package():
    from importlib.resources import files

    shipped = files("palpcompose.templates")
    for name in TEMPLATES:
        assert "[project]" in (shipped / name / "palp.toml").read_text()


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
