"""Validating `palp.toml`: every key's type, range and allowed values, unknown names with a did-you-mean, the
placeholders in all prompts, each problem located at its file:line with a hint.

tomllib gives no line numbers, so `key_lines` scans the text for them. `Validator` collects every problem of one
file instead of stopping at the first; load.py adds the base-model and image checks (references.py) and raises
them all at once as one ProjectError.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from palpcompose.errors import Problem, ProjectError, UserError
from palpcompose.guidance import GUIDANCE_MODES
from palpcompose.placeholders import PLACEHOLDER, SUBJECT_KEY, default_prompt, placeholder_problems
from palpcompose.project.schema import (
    NAME_PATTERN,
    PROJECT_FILE,
    SECTIONS,
    TABLE_ORDER,
    PalpConfig,
    ProjectConfig,
    ProjectSection,
    SubjectConfig,
    TrainConfig,
    resolve_defaults,
    sanitize_name,
)


class Validator:
    """Collects every problem of one palp.toml. `lines` maps dotted key paths to line numbers (tomllib has none)."""

    def __init__(self, file: Path, data: bytes):
        self.file = file
        self.data = data
        self.problems: list[Problem] = []
        self.notes: list[str] = []
        self.text = ""
        self.lines: dict[tuple[str, ...], int] = {}
        self.checkable: tuple[ProjectSection | None, dict[str, SubjectConfig], int] | None = None
        self.base_model = None  # the models.BaseModelSource project.base_model names, once resolved
        self.given: set[str] = set()  # dotted keys palp.toml sets (the others get defaults)
        self.read_captions = True  # train.captions: read the images' caption files (references._check_caption)
        self.captions: dict[Path, str] = {}  # image -> its caption's prompt (with the subject's placeholder)
        self.image_sizes: dict[Path, tuple[int, int]] = {}  # image -> (width, height), EXIF orientation applied
        # image sides palp.toml gives (train.resolution, render.width, render.height: the keys with a multiple_of),
        # in range, a multiple of 8 or not: the base model's own step is checked once it is known (references.py)
        self.sizes: dict[str, int] = {}

    def error(self) -> ProjectError:
        return ProjectError(sorted(self.problems, key=lambda p: (p.line is None, p.line or 0)))

    def problem(self, key: str | None, message: str, hint: str | None = None, line: int | None = None) -> None:
        if line is None and key is not None:
            line = self.line_of(key)
        self.problems.append(Problem(str(self.file), message, key=key, line=line, hint=hint))

    def line_of(self, key: str) -> int | None:
        """Line of a dotted key (`train.steps`, `render.seeds[2]`), else of its closest enclosing table."""
        parts = tuple(re.sub(r"\[\d+\]$", "", key).split("."))
        while parts:
            if parts in self.lines:
                return self.lines[parts]
            parts = parts[:-1]
        return None

    # -- parsing ---------------------------------------------------------------------------------------------------

    def parse(self) -> ProjectConfig | None:
        try:
            self.text = self.data.decode("utf-8").removeprefix("\ufeff")  # Notepad's "UTF-8 with BOM" is UTF-8
        except UnicodeDecodeError as exc:
            line = self.data[: exc.start].count(b"\n") + 1
            self.problem(None, "the file is not UTF-8 text", "save it as UTF-8", line=line)
            return None
        try:
            doc = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as exc:
            # Python < 3.14 puts the position only in the message: "Invalid value (at line 6, column 14)".
            where = re.search(r"\(at line (\d+), column (\d+)\)$", str(exc))
            message = str(exc)[: where.start()].rstrip() if where else str(exc)
            line = int(where.group(1)) if where else getattr(exc, "lineno", None)
            twice = _defined_twice(self.text, line) if message.startswith("Cannot") and line else None
            if twice:  # tomllib names neither the key nor where it was first set
                key, hint, first = twice
                self.problem(key, f"is defined twice{f' (first on line {first})' if first else ''}", hint, line=line)
                return None
            if where:
                message += f" (column {where.group(2)})"
            self.problem(None, f"TOML syntax error: {message}", _syntax_hint(exc, self.text), line=line)
            return None
        self.lines = key_lines(self.text)

        for name in doc:
            if name not in TABLE_ORDER:
                self.problem(name, "unknown table" if isinstance(doc[name], dict) else "unknown key",
                             did_you_mean(name, TABLE_ORDER, f"allowed tables: {', '.join(TABLE_ORDER)}"))
        sections: dict[str, Any] = {}
        for name, cls in SECTIONS.items():
            table = doc.get(name, {})
            if name == "project" and "project" not in doc:
                self.problem("project", "missing [project] table",
                             'add:\n[project]\nname = "my-project"\nbase_model = "builtin:toy"', line=1)
                sections[name] = None
            elif not isinstance(table, dict):
                self.problem(name, f"must be a table ([{name}]), got {_describe(table)}")
                sections[name] = None
            else:
                sections[name] = self.section(cls, table, name)
        subjects, declared, subjects_ok = self.subjects(doc.get("subjects"))
        palp, train, render = sections["palp"], sections["train"], sections["render"]
        self.cross_checks(doc, declared)
        name_ok = self.check_name(doc)
        # What the base-model and image checks can still look at when other parts are broken.
        self.checkable = (sections["project"], subjects, train.resolution if train else TrainConfig.resolution)
        self.read_captions = train.captions if train else TrainConfig.captions
        if not (subjects_ok and name_ok) or any(section is None for section in sections.values()):
            return None
        # Resolve the documented "default: X" values, so every consumer sees the same numbers.
        return resolve_defaults(sections["project"], subjects, palp, train, render)

    def section(self, cls: type, table: dict, prefix: str) -> Any:
        """Build one dataclass from a TOML table; None when it has problems (they are recorded)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        values, ok = {}, True
        for key, value in table.items():
            self.given.add(f"{prefix}.{key}")
            if key not in fields:
                extra = f"keys of [{prefix}]: {', '.join(fields)}"
                self.problem(f"{prefix}.{key}", "unknown key", did_you_mean(key, fields, extra))
                ok = False
                continue
            converted = self.value(f"{prefix}.{key}", value, hints[key], fields[key].metadata)
            if converted is _INVALID:
                ok = False
            elif fields[key].default is dataclasses.MISSING and isinstance(converted, str) and not converted.strip():
                self.problem(f"{prefix}.{key}", "must not be empty", fields[key].metadata["doc"])
                ok = False
            else:
                values[key] = converted
        for name, f in fields.items():
            if f.default is dataclasses.MISSING and name not in values and (name not in table):
                self.problem(f"{prefix}.{name}", "required key is missing", f"add `{name} = ...` ({f.metadata['doc']})",
                             line=self.line_of(prefix))
                ok = False
        return cls(**values) if ok else None

    def subjects(self, table: Any) -> tuple[dict[str, SubjectConfig], set[str], bool]:
        """(the subjects that parsed, every declared subject key, whether all of them parsed)."""
        example = ('add a subject:\n[subjects.V1]\nclass_name = "cat"\nimages = ["refs/cat/*.jpg"]\n'
                   'prompt = "A photo of [V1]"')
        if not isinstance(table, dict) or not table:
            self.problem("subjects", "no subjects: a project needs at least one", example,
                         line=self.line_of("subjects") or 1)
            return {}, set(), False
        subjects, ok = {}, True
        declared = {key for key in table if SUBJECT_KEY.match(key)}
        for key, sub in table.items():
            if not SUBJECT_KEY.match(key):
                fixed = re.sub(r"^[vV]\s*0*", "V", key)
                hint = f"did you mean [subjects.{fixed}]?" if SUBJECT_KEY.match(fixed) else \
                    "subjects are named V1, V2, ... and used as [V1], [V2], ... in prompts"
                self.problem(f"subjects.{key}", "subject keys must be V followed by a number (V1, V2, ...)", hint)
                ok = False
                continue
            if not isinstance(sub, dict):
                self.problem(f"subjects.{key}", f"must be a table ([subjects.{key}]), got {_describe(sub)}")
                ok = False
                continue
            parsed = self.section(SubjectConfig, sub, f"subjects.{key}")
            if parsed is None:
                ok = False
            elif not parsed.images:
                self.problem(f"subjects.{key}.images", "no images listed", 'e.g. images = ["refs/cat/*.jpg"]')
                ok = False
            else:
                subjects[key] = parsed
        return dict(sorted(subjects.items(), key=lambda kv: int(kv[0][1:]))), declared, ok

    def value(self, key: str, value: Any, hint: Any, meta: dict) -> Any:
        """Check one value against its type and constraints. Returns the converted value or _INVALID."""
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin in (typing.Union, types.UnionType):  # `X | None`: TOML has no null, so just X
            hint = next(a for a in args if a is not type(None))
            origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin is tuple:
            item_type = args[0]
            if isinstance(value, str) and item_type is str:
                value = [value]
            if not isinstance(value, list):
                self.problem(key, f"must be a list of {_type_name(item_type)}s, got {_describe(value)}",
                             f"e.g. {key.split('.')[-1]} = [{_example(item_type)}]")
                return _INVALID
            items = [self.value(f"{key}[{i}]", item, item_type, meta) for i, item in enumerate(value)]
            return _INVALID if any(i is _INVALID for i in items) else tuple(items)
        if meta["choices"]:
            choices = meta["choices"]
            if value not in choices:
                self.problem(key, f"must be one of {', '.join(map(repr, choices))}, got {_describe(value)}",
                             did_you_mean(str(value), choices))
                return _INVALID
            return value
        expected = hint
        ok = (isinstance(value, expected) and not (expected is int and isinstance(value, bool))) or (
            expected is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            fix = None
            if isinstance(value, str) and expected in (int, float) and _is_number(value):
                fix = f"remove the quotes: {key.split('.')[-1].split('[')[0]} = {value.strip()}"
            elif isinstance(value, str) and expected is bool and value.lower() in ("true", "false"):
                fix = f"write {value.lower()} without quotes"
            elif isinstance(value, float) and expected is int and value.is_integer():
                fix = f"write {int(value)}"
            self.problem(key, f"must be {_a(_type_name(expected))}, got {_describe(value)}", fix)
            return _INVALID
        if expected is float:
            value = float(value)
            if not math.isfinite(value):  # TOML allows inf and nan
                self.problem(key, f"must be a finite number, got {value}")
                return _INVALID
        if expected in (int, float) and not self.in_range(key, value, meta):
            return _INVALID
        return value

    def in_range(self, key: str, value: float, meta: dict) -> bool:
        ge, gt, le, multiple = meta["ge"], meta["gt"], meta["le"], meta["multiple_of"]
        if (ge is not None and value < ge) or (gt is not None and value <= gt) or (le is not None and value > le):
            bounds = [f">= {format_number(ge)}" if ge is not None else None,
                      f"> {format_number(gt)}" if gt is not None else None,
                      f"<= {format_number(le)}" if le is not None else None]
            self.problem(key, f"must be {' and '.join(b for b in bounds if b)}, got {format_number(value)}")
            return False
        if multiple is not None:
            self.sizes[key] = int(value)
        if multiple is not None and value % multiple:
            lower = int(value) // multiple * multiple
            near = " or ".join(str(n) for n in (lower, lower + multiple) if n >= (ge or 0) and n > 0)
            self.problem(key, f"must be a multiple of {multiple}, got {format_number(value)}", f"use {near}")
            return False
        return True

    # -- checks across keys ----------------------------------------------------------------------------------------

    def cross_checks(self, doc: dict, declared: set[str]) -> None:
        """Placeholders and required prompts. Reads the raw TOML, so it runs even when other keys are broken."""
        palp = doc.get("palp") if isinstance(doc.get("palp"), dict) else {}
        render = doc.get("render") if isinstance(doc.get("render"), dict) else {}
        subjects = doc.get("subjects") if isinstance(doc.get("subjects"), dict) else {}
        # A subject without a prompt gets "A photo of [Vn]", which passes every check below.
        prompts = [(f"subjects.{k}.prompt", sub.get("prompt", default_prompt(k))) for k, sub in subjects.items()
                   if k in declared and isinstance(sub, dict)]
        prompts += [("palp.target_prompt", palp.get("target_prompt")), ("palp.clean_prompt", palp.get("clean_prompt")),
                    ("render.negative_prompt", render.get("negative_prompt"))]
        if isinstance(render.get("prompts"), list):
            prompts += [(f"render.prompts[{i}]", p) for i, p in enumerate(render["prompts"])]
            for i, p in enumerate(render["prompts"]):
                if isinstance(p, str) and not p.strip():
                    self.problem(f"render.prompts[{i}]", "is empty", "remove it, or write the prompt to render")

        for key, prompt in prompts:
            if not isinstance(prompt, str):
                continue  # missing, or a wrong type reported by the key's own check
            used = list(dict.fromkeys(PLACEHOLDER.findall(prompt)))
            if key == "palp.clean_prompt":
                for message, hint in placeholder_problems(prompt, None):
                    self.problem(key, message, hint)
                if used:
                    self.problem(key, f"the clean prompt must not contain placeholders, found "
                                      f"{', '.join(f'[{u}]' for u in used)}",
                                 "name the classes instead, e.g. 'An oil painting of a cat sitting on a rock'")
                continue
            for message, hint in placeholder_problems(prompt, declared):
                self.problem(key, message, hint)
            subject = key.split(".")[1] if key.startswith("subjects.") else None
            if subject and f"[{subject}]" not in prompt:
                self.problem(key, f"must contain the subject's own placeholder [{subject}], got {prompt!r}",
                             f'e.g. prompt = "{default_prompt(subject)}"')

        if render.get("seeds") == []:
            self.notes.append(f"{self.file}: render.seeds is empty: `render` will need --seeds (or list seeds, e.g. "
                              "seeds = [0, 1, 2, 3], or remove the key for that default)")

        guidance = palp.get("guidance", PalpConfig.guidance)
        if guidance in GUIDANCE_MODES and guidance != "none":
            for name in ("target_prompt", "clean_prompt"):
                value = palp.get(name)
                if value is None or (isinstance(value, str) and not value.strip()):
                    self.problem(f"palp.{name}", f"required when palp.guidance = {guidance!r}",
                                 'set it (see docs/schema.md), or set guidance = "none" to train without '
                                 "prompt-alignment guidance", line=self.line_of(f"palp.{name}") or 1)
        target = palp.get("target_prompt")
        if guidance == "none" and not target and not render.get("prompts"):
            self.notes.append(f"{self.file}: no palp.target_prompt and no render.prompts: `render` will need "
                              "--prompt")
        if isinstance(target, str) and target.strip() and not PLACEHOLDER.search(target):
            self.notes.append(f"{self.file}: palp.target_prompt has no placeholder, so renders will not show any "
                              "subject")
        alpha, beta = palp.get("alpha", PalpConfig.alpha), palp.get("beta", PalpConfig.beta)
        if guidance != "none" and isinstance(alpha, (int, float)) and isinstance(beta, (int, float)) and alpha <= beta:
            self.notes.append(f"{self.file}: palp.alpha ({alpha}) <= palp.beta ({beta}); the paper finds alpha > beta "
                              "aligns better")

    def check_name(self, doc: dict) -> bool:
        name = doc.get("project", {}).get("name") if isinstance(doc.get("project"), dict) else None
        if not isinstance(name, str) or not name.strip() or NAME_PATTERN.match(name):  # "" is reported as empty
            return True
        self.problem("project.name", f"{name!r} may contain only ASCII letters (a-z, A-Z), digits, '-' and '_' "
                     "(1-64 characters): it becomes part of the learned tokens, <name-v1>",
                     f"e.g. name = {sanitize_name(name)!r}")
        return False


_INVALID = object()  # Validator.value's answer for a value with a problem (None is a valid value)


# ----------------------------------------------------------------------------------------------------------------
# Small helpers


def check_option(option: str, key: str, value: Any) -> Any:
    """A command-line option that stands for a palp.toml key (`train --steps` for train.steps) takes that key's type
    and range, checked by the code that checks the file (`Validator.value`): the one place of both. None (the option
    not given) passes. Raises UserError naming the option and the fix, before any work."""
    if value is None:
        return None
    section, name = key.split(".")
    cls = SECTIONS[section]
    meta = next(f.metadata for f in dataclasses.fields(cls) if f.name == name)
    v = Validator(Path(PROJECT_FILE), b"")
    checked = v.value(key, value, typing.get_type_hints(cls)[name], meta)
    if v.problems:
        problem = v.problems[0]
        hint = f"; {problem.hint}" if problem.hint else ""
        raise UserError(f"{option} {format_number(value) if isinstance(value, (int, float)) else value}: "
                        f"{problem.message} (the range of {key} in palp.toml){hint}")
    return checked


def did_you_mean(word: str, choices, fallback: str | None = None) -> str | None:
    near = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if not near:
        near = [c for c in choices if c.lower() == word.lower()]
    return f"did you mean {near[0]!r}?" if near else fallback


def _type_name(t: Any) -> str:
    return {str: "string", int: "integer", float: "number", bool: "boolean (true or false)"}.get(t, str(t))


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _example(t: Any) -> str:
    return {str: '"..."', int: "0, 1", float: "1.0"}.get(t, "...")


def _describe(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "table"}.get(
        type(value), type(value).__name__)
    shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
    return f"{shown if len(shown) <= 60 else shown[:57] + '...'} ({kind})"


def format_number(x: float) -> str:
    """1.0 -> "1", 0.5 -> "0.5", 7 -> "7"."""
    return f"{x:g}" if isinstance(x, float) else str(x)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _syntax_hint(exc: Exception, text: str) -> str | None:
    message = str(exc)
    if "Invalid value" in message or "Invalid initial character" in message:
        return 'strings need quotes, e.g. name = "my-project"'
    if "Cannot overwrite a value" in message or "Cannot declare" in message:
        return "each key and table may appear only once"
    if "Unclosed" in message or "Expected" in message:
        return "check for a missing quote, bracket or comma on this line"
    return None


# ----------------------------------------------------------------------------------------------------------------
# Line numbers: where each table and key is written in palp.toml


_HEADER = re.compile(r"^\s*\[\[?\s*([^\]#]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*((?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'))*)\s*=")


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Line numbers of `[table]` headers and `key =` lines, by full dotted path. Skips multi-line strings."""
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    in_string = None
    for number, line in enumerate(text.splitlines(), start=1):
        if in_string:
            if line.count(in_string) % 2 == 1:
                in_string = None
            continue
        header = _HEADER.match(line)
        if header:
            table = _split_key(header.group(1))
            lines.setdefault(table, number)
            continue
        key = _KEY.match(line)
        if key:
            path = table + _split_key(key.group(1))
            for i in range(len(table) + 1, len(path) + 1):
                lines.setdefault(path[:i], number)
        for quote in ('"""', "'''"):
            if line.count(quote) % 2 == 1:
                in_string = quote
    return lines


def _defined_twice(text: str, line: int) -> tuple[str, str, int | None] | None:
    """For tomllib's "Cannot overwrite a value" / "Cannot declare ... twice" at `line`: (the dotted key defined
    twice, a hint, the line of its first definition)."""
    lines = text.splitlines()
    if not 0 < line <= len(lines):
        return None
    before = key_lines("\n".join(lines[: line - 1]))
    table: tuple[str, ...] = ()
    for earlier in lines[: line - 1]:  # the table the line is in
        header = _HEADER.match(earlier)
        if header:
            table = _split_key(header.group(1))
    header, key = _HEADER.match(lines[line - 1]), _KEY.match(lines[line - 1])
    if header:
        path = _split_key(header.group(1))
        hint = f"each table may appear only once: move the keys under this [{'.'.join(path)}] into the first one"
    elif key:
        path, hint = table + _split_key(key.group(1)), "each key may appear only once: delete one of the two lines"
    else:
        return None
    return ".".join(path), hint, before.get(path)


def _split_key(dotted: str) -> tuple[str, ...]:
    parts = re.findall(r"\"[^\"]*\"|'[^']*'|[^.\s]+", dotted)
    return tuple(p.strip("\"'") for p in parts)

