"""Placeholders: how prompts name the subjects, and what a placeholder becomes.

Subject `Vn` (a `[subjects.Vn]` table, n = 1, 2, ...) is written `[Vn]` in prompts. For the personalized model it
becomes the subject's learned token `<name-vn>` (`placeholder_tokens`, `expand_placeholders`); for the base model
and the metrics, its class word (`class_word_prompt`). This module is the one definition of the pattern: palp.toml's
checks, training, render and eval all read it.
"""

from __future__ import annotations

import re

from palpcompose.errors import UserError

_KEY = r"V[1-9][0-9]*"  # V1, V2, ...: subjects are numbered from 1, without leading zeros
SUBJECT_KEY = re.compile(rf"^{_KEY}$")  # a [subjects.Vn] table's name
PLACEHOLDER = re.compile(rf"\[({_KEY})\]")  # [V1] in a prompt; group 1 is the subject key
# Things that look like a placeholder but are not one: [v1], [V 1], [V01], [ V1 ], [V0].
NEAR_PLACEHOLDER = re.compile(r"\[\s*[vV]\s*0*(\d+)\s*\]")


def default_prompt(key: str) -> str:
    """The personalization prompt y_P of a subject whose palp.toml sets none: "A photo of [V1]"."""
    return f"A photo of [{key}]"


def placeholder_tokens(project_name: str, subject_keys) -> dict[str, str]:
    """The learned token of each subject: {"V1": "<name-v1>"}. Lower case, because CLIP's tokenizer lowercases text."""
    return {key: f"<{project_name}-{key}>".lower() for key in subject_keys}


def expand_placeholders(prompt: str, tokens: dict[str, str]) -> str:
    """Replace `[V1]` with `tokens["V1"]` (a learned token, or a class word). A placeholder of a subject that
    `tokens` lacks raises UserError."""

    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key not in tokens:
            raise UserError(f"prompt {prompt!r} uses [{key}], which is not a subject of this project")
        return tokens[key]

    return PLACEHOLDER.sub(sub, prompt)


def class_word_prompt(prompt: str, class_words: dict[str, str]) -> str:
    """The prompt a metric reads: each [Vn] replaced by its subject's class word (unknown [Vn] stay as written)."""
    return PLACEHOLDER.sub(lambda m: class_words.get(m.group(1), m.group(0)), prompt)


def subjects_in(prompt: str, subject_keys) -> list[str]:
    """The subjects a prompt names, in order of first appearance."""
    named = dict.fromkeys(m.group(1) for m in PLACEHOLDER.finditer(prompt))
    return [key for key in named if key in subject_keys]


def placeholder_problems(prompt: str, declared) -> list[tuple[str, str]]:
    """(message, hint) for each near-miss placeholder in `prompt` ([v1], [V 1], [V0]) and, unless `declared` is
    None, each [Vn] that is not one of the `declared` subject keys. Shared by palp.toml's checks and render's."""
    problems = []
    for m in NEAR_PLACEHOLDER.finditer(prompt):
        if not PLACEHOLDER.fullmatch(m.group(0)):
            number = int(m.group(1))
            problems.append((f"{m.group(0)!r} is not a placeholder", f"placeholders are written exactly [V{number}]"
                             if number else "subjects are numbered from 1: use [V1] (and a [subjects.V1] table)"))
    if declared is not None:
        listed = ", ".join(f"[{k}]" for k in sorted(declared, key=lambda k: int(k[1:]))) or "none"
        for u in dict.fromkeys(PLACEHOLDER.findall(prompt)):
            if u not in declared:
                problems.append((f"uses [{u}], which is not a subject of this project (subjects: {listed})",
                                 f"add a [subjects.{u}] table or fix the placeholder"))
    return problems
