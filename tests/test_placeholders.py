"""Placeholders: one pattern ([V1], [V2], ...: subjects are numbered from 1), read by every part of palpcompose."""

from __future__ import annotations

import pytest

from palpcompose import placeholders
from palpcompose.errors import UserError
from palpcompose.placeholders import (
    PLACEHOLDER,
    class_word_prompt,
    expand_placeholders,
    placeholder_problems,
    placeholder_tokens,
    subjects_in,
)


@pytest.mark.parametrize("text, keys", [("[V1]", ["V1"]), ("a [V12] and [V2]", ["V12", "V2"]),
                                        ("[V0] [V01] [v1] [V 1]", [])])
def test_the_pattern_matches_subject_keys_only(text, keys):
    assert PLACEHOLDER.findall(text) == keys


def test_expansion_to_tokens_and_class_words():
    tokens = placeholder_tokens("Cat-Proj", ["V1", "V2"])
    assert tokens == {"V1": "<cat-proj-v1>", "V2": "<cat-proj-v2>"}  # lower case, as CLIP's tokenizer reads it
    expanded = expand_placeholders("[V1] inspired by [V2] painting", tokens)
    assert expanded == "<cat-proj-v1> inspired by <cat-proj-v2> painting"
    with pytest.raises(UserError, match=r"uses \[V3\]"):
        expand_placeholders("a [V3]", tokens)
    # a metric reads class words; an unknown placeholder stays as written there
    assert class_word_prompt("a sketch of [V1] and [V3]", {"V1": "cat"}) == "a sketch of cat and [V3]"
    assert subjects_in("[V2] then [V1] then [V2] and [V9]", {"V1", "V2"}) == ["V2", "V1"]


def test_near_misses_are_problems():
    found = [message for message, _ in placeholder_problems("[v1] [V0] [V01] [V3]", {"V1"})]
    assert found == ["'[v1]' is not a placeholder", "'[V0]' is not a placeholder", "'[V01]' is not a placeholder",
                     "uses [V3], which is not a subject of this project (subjects: [V1])"]


def test_one_definition_everywhere():
    """models, evaluate and project use this module's pattern and functions, not copies of them."""
    from palpcompose import evaluate, models, project

    assert models.expand_placeholders is placeholders.expand_placeholders
    assert models.placeholder_tokens is placeholders.placeholder_tokens
    assert evaluate.class_word_prompt is placeholders.class_word_prompt
    assert evaluate.subjects_in is placeholders.subjects_in
    assert project.PLACEHOLDER is placeholders.PLACEHOLDER
    assert project.placeholder_problems is placeholders.placeholder_problems
