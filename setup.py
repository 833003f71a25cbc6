"""Packages: everything under palpcompose/, plus the top-level templates/ folder shipped as palpcompose.templates
(mapped in pyproject.toml). The rest of the configuration is in pyproject.toml."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["palpcompose", "palpcompose.*"]) + ["palpcompose.templates"])
