"""The project file `palp.toml`: its schema as frozen dataclasses, and validation that reports every problem at once.

A project folder holds `palp.toml`, reference images (relative paths only, so the folder can live in git) and `out/`.
`load_project(dir)` parses the file, checks every key (type, range, choices, unknown names with a did-you-mean), the
placeholders in all prompts, the base model and the images, and raises one `ProjectError` listing every problem with
its file, line, key and a hint. Nothing is written.

One job per module (imports flow down this list; each imports only the ones below it):
- `check`: `palpcompose check` (load, plus the base model's reachability and the prompts' token counts);
- `init`: `palpcompose init` (a project folder from a template);
- `load`: `load_project`;
- `references`: the base model and the reference images palp.toml names;
- `schema_doc`: docs/schema.md, generated from the schema (`python -m palpcompose.project --schema-md`);
- `validation`: palp.toml's keys and values, with file:line for each problem;
- `schema`: the dataclasses, each key's documentation, default and allowed values;
- `settings`: which settings change the trained weights (what makes trained weights out of date).

Every public name is importable from `palpcompose.project`, as callers have always done.
"""

from palpcompose.placeholders import NEAR_PLACEHOLDER, PLACEHOLDER, SUBJECT_KEY, placeholder_problems
from palpcompose.project.check import (
    DEFAULT_TOKEN_LIMIT,
    CheckReport,
    caption_length_problems,
    check_project,
    config_prompts,
    count_prompt_tokens,
    too_long_problems,
)
from palpcompose.project.init import DEFAULT_TEMPLATE, TEMPLATES, InitResult, init_project
from palpcompose.project.load import load_project
from palpcompose.project.references import listed_images, sampler_problem, size_problem
from palpcompose.project.schema import (
    MAX_SEED,
    MIXED_PRECISION_MODES,
    NAME_PATTERN,
    NO_FLIP_CLASSES,
    PROJECT_FILE,
    SCHEDULER_NAMES,
    SECTIONS,
    TABLE_ORDER,
    PalpConfig,
    Project,
    ProjectConfig,
    ProjectSection,
    RenderConfig,
    SubjectConfig,
    TrainConfig,
    model_dependent,
    sanitize_name,
)
from palpcompose.project.schema_doc import main, schema_markdown
from palpcompose.project.settings import (
    ADDED_LATER,
    WEIGHT_NEUTRAL,
    changed_weight_settings,
    describe_changes,
    flat_settings,
    weight_settings,
)
from palpcompose.project.validation import check_option, key_lines

__all__ = [
    "ADDED_LATER", "DEFAULT_TEMPLATE", "DEFAULT_TOKEN_LIMIT", "MAX_SEED", "MIXED_PRECISION_MODES", "NAME_PATTERN",
    "NEAR_PLACEHOLDER", "NO_FLIP_CLASSES", "PLACEHOLDER", "PROJECT_FILE", "SCHEDULER_NAMES", "SECTIONS", "SUBJECT_KEY",
    "TABLE_ORDER", "TEMPLATES", "WEIGHT_NEUTRAL", "CheckReport", "InitResult", "PalpConfig", "Project",
    "ProjectConfig", "ProjectSection", "RenderConfig", "SubjectConfig", "TrainConfig", "caption_length_problems",
    "changed_weight_settings", "check_option", "check_project", "config_prompts", "count_prompt_tokens",
    "describe_changes", "flat_settings", "init_project",
    "key_lines", "listed_images", "load_project", "main", "model_dependent", "placeholder_problems",
    "sampler_problem", "sanitize_name", "schema_markdown", "size_problem", "too_long_problems", "weight_settings",
]
