"""Everyday friction a new user meets on the command line (issue 12): what `init` says, option names, --help,
quoted paths in hints, and messages that name what is wrong."""

from __future__ import annotations

import pytest
from conftest import tree_snapshot


def test_init_with_a_hub_template_says_the_model_must_be_downloaded(tmp_path, run_cli, monkeypatch):
    from palpcompose import models

    monkeypatch.setattr(models, "_hub_cached", lambda repo_id: False)
    result = run_cli("init", tmp_path / "cat", "--template", "single-subject")
    assert result.code == 0, result.err
    assert "note:" in result.err and "not in this machine's Hugging Face cache" in result.err
    assert "hf download stabilityai/stable-diffusion-2-1-base" in result.err and "builtin:toy" in result.err
    toy = run_cli("init", tmp_path / "toy", "--template", "toy-demo")
    assert toy.code == 0 and "Hugging Face" not in toy.err
