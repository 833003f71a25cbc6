"""Resolving what `project.base_model` names, without loading its weights: a source and its family.

`base_model` may be
- `builtin:toy`: the project's own tiny model, shipped in `palpcompose/builtin/toy/` (a diffusers folder);
- a local diffusers folder (holds `model_index.json`);
- a single checkpoint file (`.safetensors`; `.ckpt`/`.pt`/`.bin` only with `project.allow_pickle = true`, since
  loading them runs pickled code);
- a hub id (`org/name`), used from the local Hugging Face cache (the commands never download).
Which family it is comes from families.py (configs, or a single file's tensor names).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from palpcompose.errors import UserError, command_line
from palpcompose.models.families import (
    FAMILY_NAMES,
    SUPPORTED_FAMILIES,
    component_file,
    family_from_index,
    family_from_keys,
    family_of,
    model_names,
)
from palpcompose.models.weight_files import check_weight_file, check_weight_files

BUILTIN_DIR = Path(__file__).parent.parent / "builtin"
BUILTIN_MODELS = {"builtin:toy": BUILTIN_DIR / "toy"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PICKLED_SUFFIXES = (".ckpt", ".pt", ".bin")
_BASE_MODEL_HINT = "base_model must be builtin:toy, a hub id (org/name), a diffusers folder or a .safetensors file"


@dataclass(frozen=True)
class BaseModelSource:
    spec: str  # what the user wrote
    kind: str  # "builtin" | "folder" | "single_file" | "hub"
    location: str  # a folder, a file, or a hub id
    available: bool  # can be loaded without the network
    detail: str  # one line for `check`: what was found, or why it cannot be verified
    allow_pickle: bool = False  # project.allow_pickle: pickled weight files may be loaded
    family: str = "unknown"  # detect_family's answer: "toy" | "sd1" | "sd2" | "sd2-v" | "sdxl" | "flux" | "sd3"
    # | "unknown"


def base_model_path(spec: str, project_dir: Path | None = None) -> Path:
    """Where on disk `spec` would be: a built-in model's folder, else the path as written (`~` expanded, relative to
    `project_dir`, never the caller's working directory). Nothing is checked; a hub id gives a path that is not
    there. `resolve_base_model` says what, if anything, is there."""
    spec = spec.strip()
    if spec in BUILTIN_MODELS:
        return BUILTIN_MODELS[spec]
    path = Path(spec).expanduser()
    return project_dir / path if not path.is_absolute() and project_dir is not None else path


def resolve_base_model(spec: str, project_dir: Path | None = None, allow_pickle: bool = False) -> BaseModelSource:
    """Say what `spec` refers to without loading its weights (a folder's model_index.json and a .safetensors file's
    header are read). Raises UserError when it cannot be a base model, or is a pickled file and `allow_pickle` is
    off (`project.allow_pickle`)."""
    spec = spec.strip()
    if spec.startswith("builtin:"):
        folder = BUILTIN_MODELS.get(spec)
        if folder is None:
            raise UserError(f"unknown built-in model {spec!r}; built-in models: {', '.join(BUILTIN_MODELS)}")
        ok = (folder / "model_index.json").is_file()
        detail = (f"built-in model at {folder}" if ok
                  else f"{spec} is not installed in this copy of palpcompose ({folder})")
        return BaseModelSource(spec, "builtin", str(folder), ok, detail, family="toy")

    path = base_model_path(spec, project_dir)
    if path.is_dir():
        family = _check_pipeline_folder(path, allow_pickle)
        return BaseModelSource(spec, "folder", str(path), True, f"diffusers folder {path} ({FAMILY_NAMES[family]})",
                               allow_pickle, family)
    if path.is_file():
        if path.suffix in PICKLED_SUFFIXES:
            if not allow_pickle:
                raise UserError(
                    f"{path}: a {path.suffix} checkpoint runs pickled code when it is loaded, so palpcompose does not "
                    "open it; use a .safetensors copy of the model, or set `allow_pickle = true` under [project] if "
                    "you trust where the file comes from")
            family = "unknown"  # its keys cannot be read without running it
        elif path.suffix == ".safetensors":
            family = _check_single_file(path)
        else:
            raise UserError(f"{path}: unsupported checkpoint type {path.suffix!r}; use a .safetensors file")
        return BaseModelSource(spec, "single_file", str(path), True, f"single checkpoint file {path}",
                               family=family)
    if path.is_symlink():
        raise UserError(f"base model {spec!r} is a broken symbolic link (to {path.readlink()})")
    if path.suffix in (".safetensors", *PICKLED_SUFFIXES) or spec.startswith((".", "/", "~")):
        raise UserError(f"base model file {spec!r} not found (relative paths are relative to the project folder)")
    if _HUB_ID.match(spec):
        cached = _hub_cached(spec)
        if cached:
            family = detect_family("hub", spec)
            check_weight_files(Path(cached).parent, _weight_folders(family), "download it again: "
                               f"`{command_line('hf', 'download', spec, '--force-download')}`")
            return BaseModelSource(spec, "hub", spec, True, f"hub model {spec} found in the local cache "
                                   f"({FAMILY_NAMES[family]})", allow_pickle, family)
        return BaseModelSource(spec, "hub", spec, False, uncached_hub_message(spec), allow_pickle)
    where = f" in {project_dir}" if project_dir is not None else ""
    raise UserError(
        f"base_model {spec!r} is neither builtin:toy, an existing folder or .safetensors file{where}, nor a hub id "
        "(org/name); relative paths are relative to the project folder: give the model's folder from there (e.g. "
        "models/sd15) or its absolute path, a hub id, or builtin:toy"
    )


def uncached_hub_message(repo_id: str) -> str:
    """What `check`, `train` and `render` say about a hub id missing from the local cache: palpcompose never
    downloads, so the model has to be fetched once, on a machine with network, or replaced by the toy model."""
    folder = f"models/{repo_id.split('/')[-1]}"
    download = command_line("hf", "download", repo_id, "--local-dir", folder)
    return (f"hub model {repo_id} is not in this machine's Hugging Face cache, and palpcompose never downloads; "
            f"download it once: `{command_line('hf', 'download', repo_id)}` fills this machine's cache (base_model "
            f"then works as it is), or `{download}` in the project folder (anywhere with network, then copy the "
            f"folder over) and set base_model = \"{folder}\"; or use base_model = \"builtin:toy\" to try the toy "
            "model first")


def _check_pipeline_folder(path: Path, allow_pickle: bool = False) -> str:
    """A diffusers pipeline folder of a supported family, with every component it needs. Returns the family."""
    index = path / "model_index.json"
    if not index.is_file():
        raise UserError(f"{path}: folder has no model_index.json; {_BASE_MODEL_HINT} (a folder as saved by "
                        "`pipeline.save_pretrained`)")
    family = detect_family("folder", str(path))  # refuses SD 3, Flux, refiners, inpainting models
    needed = list(family_of(family).folders)
    data = json.loads(index.read_text(encoding="utf-8"))  # readable: detect_family read it
    missing = [name for name in needed if not isinstance(data, dict) or name not in data]
    if missing:
        raise UserError(f"{index}: names no {', '.join(missing)}; palpcompose needs a complete "
                        f"{FAMILY_NAMES[family]} text-to-image pipeline folder")
    for name in needed:
        if not (path / name).is_dir():
            raise UserError(f"{path / name}: missing; the pipeline folder is incomplete (copy it again, or save it "
                            "with `pipeline.save_pretrained`)")
    weight_folders = _weight_folders(family)
    for name in weight_folders:
        files = [f for f in (path / name).iterdir() if f.is_file()]
        if any(f.suffix == ".safetensors" for f in files):
            continue
        if any(f.suffix in PICKLED_SUFFIXES for f in files):
            if not allow_pickle:
                raise UserError(f"{path / name}: its weights are a pickled file, which runs code when it is loaded; "
                                "save the pipeline again with safetensors (`save_pretrained(..., "
                                "safe_serialization=True)`), or set `allow_pickle = true` under [project] if you "
                                "trust where it comes from")
            continue
        raise UserError(f"{path / name}: no weights file; the pipeline folder is incomplete")
    check_weight_files(path, weight_folders, "copy or download the model again (a copy or download was cut "
                       "short), or save it again with `pipeline.save_pretrained`")
    return family


def _weight_folders(family: str) -> list[str]:
    """The components of a family's pipeline folder that hold weights (the denoiser, the VAE, the text encoders)."""
    return [n for n in family_of(family).folders if n in ("unet", "transformer", "vae") or n.startswith("text_encoder")]


def _check_single_file(path: Path) -> str:
    """Read a .safetensors file's header (no weights, no code) and make sure it holds a Stable Diffusion UNet of a
    supported family, so a LoRA or an embedding given as base_model gets a clear message instead of a failed
    download of configs. Returns the family."""
    check_weight_file(path, "download or copy it again (a download or copy was cut short)")
    keys = _safetensors_keys(path)
    # a UNet in the original layout, or a Flux / SD 3 transformer (refused by name)
    if any(k.startswith(("model.diffusion_model.", "double_blocks.", "joint_blocks.")) for k in keys):
        return detect_family("single_file", str(path))
    component = component_file(keys)
    if component is not None:  # transformer/ or unet/ of a diffusers folder, alone
        folder = path.parent.parent
        where = (f"give base_model the folder that holds it, {folder}" if (folder / "model_index.json").is_file()
                 else "give base_model the diffusers folder it comes from (the one with model_index.json), or its "
                 "hub id")
        raise UserError(f"{path}: this file is {component} in the diffusers layout, one component of a pipeline "
                        f"folder, not a whole model (no VAE, no text encoders); {where}")
    if any(k.startswith(("lora_unet_", "lora_te", "unet.", "text_encoder.")) or ".lora_" in k or "lora_A" in k
           for k in keys):
        what = "is a LoRA, not a base model"
    elif any(k in ("emb_params", "string_to_param", "clip_l", "clip_g") for k in keys):
        what = "is a textual-inversion embedding, not a base model"
    else:
        what = f"holds no Stable Diffusion UNet ({len(keys)} tensors, none named model.diffusion_model.*)"
    raise UserError(f"{path}: this file {what}; {_BASE_MODEL_HINT} holding a whole model")


def _hub_cached(repo_id: str) -> str | None:
    """The cached model_index.json of `repo_id` (its snapshot folder holds the rest), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "model_index.json")
        return hit if isinstance(hit, str) else None
    except Exception:  # noqa: BLE001 - a cache we cannot read counts as no cache (the load then says what to do)
        return None


def detect_family(kind: str, location: str) -> str:
    """The family of the model at `location` ("builtin" | "folder" | "hub" | "single_file", as BaseModelSource):
    "toy", "sd1", "sd2", "sd2-v", "sdxl", "flux" or "sd3", or "unknown" when nothing can be read offline. Reads
    configs or a .safetensors header only. Raises UserError naming the kind found for a model palpcompose cannot
    train: Flux schnell or another few-step model, Fill/Kontext/Redux/ControlNet, an SDXL refiner alone, an
    inpainting model, a single-file Flux or SD 3 checkpoint, any other pipeline class."""
    if kind == "builtin":
        return "toy"
    if kind == "single_file":
        kind_found, family = family_from_keys(_safetensors_keys(Path(location)), Path(location))
    else:
        read = config_reader(kind, location)
        index = read("model_index.json")
        if index is None:
            return "unknown"
        kind_found, family = family_from_index(index, read, model_names(kind, location, index, read))
    if family is None:
        raise UserError(f"base model {location!r} is {kind_found}; palpcompose trains {SUPPORTED_FAMILIES}: point "
                        "base_model at one of those")
    return family


def config_reader(kind: str, location: str):
    """read(name) -> the JSON object in `name` of a pipeline folder or cached hub model, or None."""

    def read(name: str):
        if kind == "hub":
            from huggingface_hub import try_to_load_from_cache

            try:
                hit = try_to_load_from_cache(location, name)
            except Exception:  # noqa: BLE001 - a cache we cannot read is no cache
                return None
            file = Path(hit) if isinstance(hit, str) else None
        else:
            file = Path(location) / name
        if file is None or not file.is_file():
            return None
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{file}: unreadable ({exc}); the folder is not a complete diffusers pipeline (copy it "
                            "again, or save it with `pipeline.save_pretrained`)") from exc
        return data if isinstance(data, dict) else None

    return read


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:  # safetensors raises its own error types for every kind of bad header
        raise UserError(f"{path}: not a readable .safetensors file ({type(exc).__name__}: {exc}); download it "
                        "again") from exc


