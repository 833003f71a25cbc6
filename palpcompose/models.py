"""Base models: resolve what `project.base_model` names, load it, and prepare it for PALP.

`base_model` may be
- `builtin:toy`: the project's own tiny model, shipped in `palpcompose/builtin/toy/` (a diffusers folder);
- a local diffusers folder (holds `model_index.json`);
- a single checkpoint file (`.safetensors`; `.ckpt` only with allow_pickle, since it executes pickled code);
- a hub id (`org/name`), used from the local Hugging Face cache; downloading happens only when allowed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from palpcompose.errors import UserError

BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTIN_MODELS = {"builtin:toy": BUILTIN_DIR / "toy"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class BaseModelSource:
    spec: str  # what the user wrote
    kind: str  # "builtin" | "folder" | "single_file" | "hub"
    location: str  # a folder, a file, or a hub id
    available: bool  # can be loaded without the network
    detail: str  # one line for `check`: what was found, or why it cannot be verified


def resolve_base_model(spec: str, project_dir: Path | None = None) -> BaseModelSource:
    """Say what `spec` refers to without loading it. Raises UserError when it cannot refer to anything."""
    spec = spec.strip()
    if spec.startswith("builtin:"):
        folder = BUILTIN_MODELS.get(spec)
        if folder is None:
            raise UserError(f"unknown built-in model {spec!r}; built-in models: {', '.join(BUILTIN_MODELS)}")
        ok = (folder / "model_index.json").is_file()
        detail = f"built-in model at {folder}" if ok else f"{spec} is not installed in this copy of palpcompose ({folder})"
        return BaseModelSource(spec, "builtin", str(folder), ok, detail)

    path = Path(spec).expanduser()
    if not path.is_absolute() and project_dir is not None and (project_dir / path).exists():
        path = project_dir / path
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserError(
                f"{path}: folder has no model_index.json; base_model must be a diffusers pipeline folder "
                "(as saved by `pipeline.save_pretrained`), a .safetensors file, a hub id or builtin:toy"
            )
        return BaseModelSource(spec, "folder", str(path), True, f"diffusers folder {path}")
    if path.is_file():
        if path.suffix not in (".safetensors", ".ckpt", ".pt", ".bin"):
            raise UserError(f"{path}: unsupported checkpoint type {path.suffix!r}; use a .safetensors file")
        return BaseModelSource(spec, "single_file", str(path), True, f"single checkpoint file {path}")
    if path.suffix in (".safetensors", ".ckpt") or spec.startswith((".", "/", "~")):
        raise UserError(f"base model file {spec!r} not found (relative paths are relative to the project folder)")
    if _HUB_ID.match(spec):
        cached = _hub_cached(spec)
        if cached:
            return BaseModelSource(spec, "hub", spec, True, f"hub model {spec} found in the local cache")
        return BaseModelSource(spec, "hub", spec, False, f"hub model {spec}: not in the local cache, not verifiable offline")
    raise UserError(
        f"base_model {spec!r} is neither builtin:toy, an existing folder or .safetensors file, nor a hub id (org/name)"
    )


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "model_index.json")
        return isinstance(hit, str)
    except Exception:
        return False


def load_pipeline(source: BaseModelSource, torch_dtype=None, allow_download: bool = False, allow_pickle: bool = False):
    """Load the base text-to-image pipeline that `source` names, offline unless `allow_download`.

    Returns a diffusers `StableDiffusionPipeline` (SD 1.x / 2.x). The caller moves it to a device and sets dtypes.
    """
    import torch
    from diffusers import StableDiffusionPipeline

    torch_dtype = torch_dtype or torch.float32
    if source.kind in ("builtin", "folder"):
        if not source.available:
            raise UserError(source.detail)
        return StableDiffusionPipeline.from_pretrained(
            source.location, torch_dtype=torch_dtype, local_files_only=True, safety_checker=None,
            requires_safety_checker=False,
        )
    if source.kind == "single_file":
        if Path(source.location).suffix != ".safetensors" and not allow_pickle:
            raise UserError(
                f"{source.location}: this checkpoint format runs pickled code when loaded; convert it to .safetensors, "
                "or pass --allow-pickle if you trust its origin"
            )
        return StableDiffusionPipeline.from_single_file(
            source.location, torch_dtype=torch_dtype, local_files_only=not allow_download,
        )
    if source.kind == "hub":
        try:
            return StableDiffusionPipeline.from_pretrained(
                source.location, torch_dtype=torch_dtype, local_files_only=not allow_download, safety_checker=None,
                requires_safety_checker=False,
            )
        except OSError as exc:
            raise UserError(
                f"hub model {source.location!r} is not in the local Hugging Face cache and downloading is off: "
                f"download it first (`hf download {source.location}`) or point base_model at a local folder ({exc})"
            ) from exc
    raise ValueError(f"unknown base model kind {source.kind!r}")


def placeholder_tokens(project_name: str, subject_keys) -> dict[str, str]:
    """The learned token of each subject: {"V1": "<name-v1>"}. Lower case, because CLIP's tokenizer lowercases text."""
    return {key: f"<{project_name}-{key}>".lower() for key in subject_keys}


_PLACEHOLDER = re.compile(r"\[(V\d+)\]")


def expand_placeholders(prompt: str, tokens: dict[str, str]) -> str:
    """Replace `[V1]` with subject V1's token. Unknown placeholders raise UserError."""

    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key not in tokens:
            raise UserError(f"prompt {prompt!r} uses [{key}], which is not a subject of this project")
        return tokens[key]

    return _PLACEHOLDER.sub(sub, prompt)
