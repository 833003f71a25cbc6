"""Converting a project's trained weights to the formats other tools load (`palpcompose export`).

- `diffusers`: `PATH/pytorch_lora_weights.safetensors` (UNet LoRA, keys as diffusers' own training scripts save them,
  with the LoRA config in the `lora_adapter_metadata` header entry so `lora_alpha` survives), loadable by
  `pipe.load_lora_weights(PATH)`, and one `PATH/<trigger>.safetensors` per subject holding `{token: embedding}`,
  loadable by `pipe.load_textual_inversion(file, token=token)`.
- `webui`: `PATH/<project>.safetensors`, a kohya-style LoRA (`lora_unet_..._to_q.lora_down.weight`, `.lora_up.weight`
  and `.alpha` per layer) as AUTOMATIC1111, ComfyUI and most other tools load it, and one `PATH/<trigger>.safetensors`
  per subject holding `{"emb_params": (1, dim)}`, the embedding format AUTOMATIC1111 writes itself.

SDXL (weights trained on an SDXL base model): each subject's file holds `{"clip_l": (1, 768), "clip_g": (1, 1280)}`,
its embedding in each text encoder, in both formats: the file AUTOMATIC1111 and ComfyUI load as an SDXL embedding,
and what diffusers' SDXL pivotal-tuning recipe loads with two `load_textual_inversion` calls (`state_dict["clip_l"]`
into `text_encoder`/`tokenizer`, `state_dict["clip_g"]` into `text_encoder_2`/`tokenizer_2`). The webui LoRA uses the
key names kohya's sd-scripts write for SDXL, the original (SGM) UNet's block names
(`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), mapped from diffusers' block names by `sgm_key`; the
diffusers LoRA keeps diffusers' names (`load_lora_weights` of an SDXL pipeline reads them as for SD 1.x). No text
encoder LoRA is trained, so no `lora_te1_`/`lora_te2_` keys are written.

Flux.1 and SD 3 (flow families): the diffusers LoRA has peft's keys prefixed `transformer.`, as their pipelines'
save_lora_weights write them; the webui file has the same keys plus `.alpha` (and DoRA's `.dora_scale`) per module,
the names ComfyUI's own key map reads for these models (`flow_single_file`; docs/flux-sd3.md, "The single file in
ComfyUI"), not kohya names.

The trigger word of a subject is its token without the angle brackets (`<cat-wanderer-v1>` -> `cat-wanderer-v1`):
AUTOMATIC1111 and ComfyUI name an embedding after its file, and `<` and `>` are not allowed in Windows file names.
Key names come from diffusers' own converters (peft -> diffusers, peft -> kohya); only SDXL's diffusers -> SGM
block numbering (the inverse of diffusers' `_maybe_map_sgm_blocks_to_diffusers`) is computed here.
Every file carries the tokens, trigger words, base model and palpcompose version in its safetensors header.
Existing files are never overwritten unless `force`; other files in PATH are left alone.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from palpcompose import __version__
from palpcompose.errors import UserError, WeightsDoNotFit
from palpcompose.fsutil import atomic_write_files, check_folder_can_be_made, os_error_text, safetensors_bytes
from palpcompose.outputs import (
    RENDERS_DIR,
    RUN_FOLDERS,
    RUNS_DIR,
    check_trained_for,
    load_weights,
    locate_weights,
    out_dir,
    read_manifest,
    run_out_dir,
)
from palpcompose.project import listed_images
from palpcompose.weights import TrainedWeights

FORMATS = ("diffusers", "webui")
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"  # the name `load_lora_weights(PATH)` looks for


@dataclass(frozen=True)
class ExportedFile:
    path: Path
    kind: str  # "lora" or "embedding"
    subject: str | None  # "V1" for an embedding
    token: str | None  # the token the embedding was trained as, e.g. "<cat-wanderer-v1>"
    trigger: str | None  # the word to write in prompts of the target tool


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    fmt: str
    weights: str  # "final" or "step-000100"
    files: tuple[ExportedFile, ...]
    warnings: tuple[str, ...]


def trigger_word(token: str) -> str:
    """`<cat-wanderer-v1>` -> `cat-wanderer-v1`: a token as a file name, and as the word other tools match."""
    return token.strip("<>")


def export(project, fmt: str, out_path, step: int | None = None, force: bool = False,
           run: str | None = None) -> ExportResult:
    """Write the project's trained weights (final, or snapshot `step`; of the run kept in out/runs/<run>/ with
    `run`) to `out_path` in format `fmt`."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not known; choose one of: {', '.join(FORMATS)}")
    out_dir = run_out_dir(project, run)
    folder, label, warnings = locate_weights(project, out_dir, step)
    warnings += check_trained_for(project, out_dir, read_manifest(out_dir))
    weights = load_weights(folder)

    if not str(out_path).strip():
        raise UserError("--out is empty; give the folder to write to, e.g. --out exported/")
    out_path = Path(out_path).expanduser()
    if out_path.exists() and not out_path.is_dir():
        raise UserError(f"--out {out_path}: is a file; give a folder (it is created if missing)")
    _check_out_place(project, out_path)
    header = _header(project, weights, label)
    if fmt == "diffusers":
        plan = _diffusers_files(weights, out_path, header)
    else:
        plan = _webui_files(project, weights, out_path, header, _sdxl_layers_per_block(project) if
                            weights.text_encoder_dims else None)

    existing = [str(f.path) for f, _, _ in plan if f.path.exists()]
    if existing and not force:
        raise UserError(
            f"--out {out_path}: would overwrite {', '.join(existing)}; choose another folder or pass --force"
        )
    check_folder_can_be_made(out_path, "--out")
    try:  # all files or none: a full disk leaves --out as it was (with --force too)
        atomic_write_files({exported.path: safetensors_bytes(tensors, metadata)
                            for exported, tensors, metadata in plan})
    except OSError as exc:
        raise UserError(f"--out {out_path}: could not write ({os_error_text(exc)}); nothing was changed there; "
                        "choose a folder you can write to") from exc
    return ExportResult(out_path, fmt, label, tuple(f for f, _, _ in plan), tuple(warnings))


def _check_out_place(project, out_path: Path) -> None:
    """--out must not mix the exported files with what palpcompose manages (out/ itself, a run's folders in it) or
    with the reference images (the next `check` or `train` would meet .safetensors files among them). A new
    folder of its own inside out/ (out/exports/) is fine."""
    target = out_path.resolve()
    out = out_dir(project.root).resolve()
    managed = (*RUN_FOLDERS, RENDERS_DIR, RUNS_DIR)
    if target == out or (target.is_relative_to(out) and target.relative_to(out).parts[0] in managed):
        raise UserError(f"--out {out_path}: is palpcompose's own {_shown(project, target)} folder, where exported "
                        "files would mix with the runs; choose a folder of its own, e.g. "
                        f"{_shown(project, out / 'exports')} or a folder outside the project")
    try:
        folders = {path.parent.resolve() for paths in listed_images(project).values() for path in paths}
    except OSError:  # unreadable references are check's and train's to report
        folders = set()
    for folder in sorted(folders):
        if target == folder or target.is_relative_to(folder):
            raise UserError(f"--out {out_path}: holds the reference images ({_shown(project, folder)}); exported "
                            "weights there would be mixed with them; choose another folder")


def _shown(project, path: Path) -> str:
    try:
        return path.relative_to(project.root.resolve()).as_posix() + "/"
    except ValueError:
        return str(path)


def _header(project, weights: TrainedWeights, label: str) -> dict[str, str]:
    """What every exported file says about itself (safetensors header values must be strings)."""
    return {
        "palpcompose_version": __version__,
        "palpcompose_project": project.config.project.name,
        "palpcompose_weights": label,
        "palpcompose_step": str(weights.step),
        "base_model": project.config.project.base_model,
        "tokens": json.dumps(weights.placeholders, sort_keys=True),
        "trigger_words": json.dumps(
            {k: trigger_word(t) for k, t in weights.placeholders.items()}, sort_keys=True
        ),
    }


def _embedding_files(weights, out_path, header, as_tensors):
    """One file per subject, named after its trigger word."""
    plan = []
    for key, token in sorted(weights.placeholders.items()):
        if token not in weights.embeddings:
            raise UserError(
                f"the trained weights have no embedding for {token} (subject {key}); retrain the project"
            )
        trigger = trigger_word(token)
        meta = {**header, "subject": key, "token": token, "trigger_word": trigger}
        exported = ExportedFile(out_path / f"{trigger}.safetensors", "embedding", key, token, trigger)
        if weights.encoder_keys:  # Flux.1, SD 3: the pivotal-tuning layout, one (1, D) tensor per encoder
            parts = weights.per_encoder(token)
            plan.append((exported, {k: v.float()[None, :] for k, v in zip(weights.encoder_keys, parts, strict=True)},
                         meta))
        elif weights.text_encoder_dims:  # SDXL: one (1, D) tensor per text encoder, in either format
            clip_l, clip_g = (v.float()[None, :] for v in weights.per_encoder(token))
            plan.append((exported, {"clip_l": clip_l, "clip_g": clip_g}, meta))
        else:
            plan.append((exported, as_tensors(token, weights.embeddings[token].float().reshape(-1)), meta))
    return plan


def _transformer_lora(weights: TrainedWeights) -> dict[str, torch.Tensor]:
    """A flow family's LoRA as FluxPipeline / StableDiffusion3Pipeline.save_lora_weights write it: peft's keys on
    the transformer, prefixed `transformer.` (`transformer.transformer_blocks.0.attn.to_q.lora_A.weight`)."""
    return {f"transformer.{k}": v.float() for k, v in weights.lora.items()}


def _diffusers_files(weights: TrainedWeights, out_path: Path, header):
    from diffusers.utils import convert_state_dict_to_diffusers

    if weights.encoder_keys:  # Flux.1, SD 3: the transformer's LoRA, read by the pipeline's load_lora_weights
        config = {"r": weights.rank, "lora_alpha": weights.lora_alpha, "target_modules": list(weights.target_modules),
                  **({"use_dora": True} if weights.adapter == "dora" else {})}  # DoRA: the magnitude vectors load
        meta = {**header, "format": "pt", "lora_adapter_metadata": json.dumps(
            {f"transformer.{k}": v for k, v in config.items()}, sort_keys=True)}
        plan = [(ExportedFile(out_path / DIFFUSERS_LORA_FILE, "lora", None, None, None), _transformer_lora(weights),
                 meta)]
        return plan + _embedding_files(weights, out_path, header, None)

    # peft keys (`...to_q.lora_A.weight`) -> diffusers keys (`unet....to_q.lora.down.weight`), as the diffusers LoRA
    # training scripts save them; diffusers reads lora_alpha back from `lora_adapter_metadata` (else it assumes r).
    lora = {f"unet.{k}": v.float() for k, v in convert_state_dict_to_diffusers(dict(weights.lora)).items()}
    lora_config = {
        "r": weights.rank,
        "lora_alpha": weights.lora_alpha,
        "target_modules": list(weights.target_modules),
        **({"use_dora": True} if weights.adapter == "dora" else {}),  # DoRA: `...lora_magnitude_vector` keys
    }
    meta = {
        **header,
        "format": "pt",
        "lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in lora_config.items()}, sort_keys=True),
    }
    plan = [(ExportedFile(out_path / DIFFUSERS_LORA_FILE, "lora", None, None, None), lora, meta)]
    return plan + _embedding_files(weights, out_path, header, lambda token, vector: {token: vector})


def sgm_key(key: str, layers_per_block: int) -> str:
    """A kohya key with diffusers' block names -> the original SGM UNet's (kohya's SDXL names): down block i's
    attention j is input block 1 + i (L + 1) + j, sub-module 1; the mid block's attention is middle block 1; up
    block i's attention j is output block i (L + 1) + j (L = layers_per_block; up blocks have L + 1 layers)."""
    per_block = layers_per_block + 1
    if m := re.match(r"lora_unet_down_blocks_(\d+)_attentions_(\d+)_(.+)", key):
        return f"lora_unet_input_blocks_{1 + int(m[1]) * per_block + int(m[2])}_1_{m[3]}"
    if m := re.match(r"lora_unet_mid_block_attentions_0_(.+)", key):
        return f"lora_unet_middle_block_1_{m[1]}"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_attentions_(\d+)_(.+)", key):
        return f"lora_unet_output_blocks_{int(m[1]) * per_block + int(m[2])}_1_{m[3]}"
    raise WeightsDoNotFit(f"{key}: not an attention layer of the UNet; palpcompose's LoRA has only those")


def _sdxl_layers_per_block(project) -> int:
    """The SDXL UNet's layers_per_block, from its config (2 for SDXL base, which a single file is taken to be)."""
    from palpcompose.models import config_reader, resolve_base_model

    cfg = project.config.project
    source = resolve_base_model(cfg.base_model, project.root, cfg.allow_pickle)
    if source.kind in ("folder", "hub"):
        unet = config_reader(source.kind, source.location)("unet/config.json") or {}
        return int(unet.get("layers_per_block", 2))
    return 2


DORA_MAGNITUDE = ".lora_magnitude_vector"  # peft's key of a DoRA layer's magnitude vector (out_features,)


def dora_scales(magnitudes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's DoRA magnitudes -> the kohya/LyCORIS `<module>.dora_scale` keys ComfyUI reads, each (out_features, 1).

    peft normalises each output row: W' = m / ||W + s B A||_row * (W + s B A), m of shape (out,). LyCORIS writes
    that decomposition (its `wd_on_out`) as `dora_scale` of shape (out, 1); ComfyUI and Forge tell it from the
    input-axis one (1, in) by `dora_scale.shape[0] == out` (comfy/weight_adapter/base.py, weight_decompose). A 1-D
    (out,) vector would broadcast against ComfyUI's (out, 1) norm into an (out, out) matrix (ComfyUI issue 12938).
    The values are peft's magnitudes themselves (docs/render-export.md, "DoRA", says what each tool does with them).
    """
    return {f"lora_unet_{key.removesuffix(DORA_MAGNITUDE).replace('.', '_')}.dora_scale": value.float().reshape(-1, 1)
            for key, value in magnitudes.items()}


def flow_single_file(weights: TrainedWeights) -> dict[str, torch.Tensor]:
    """A flow family's single-file LoRA, in the keys ComfyUI's own LoRA key map reads for Flux.1 and SD 3
    (docs/flux-sd3.md, "The single file in ComfyUI"): per module `transformer.<diffusers name>.lora_A.weight` and
    `.lora_B.weight`, `.alpha` (the trained lora_alpha, so ComfyUI's scale alpha / rank is the trained one) and, for
    DoRA, `.dora_scale` of shape (out_features, 1) in place of peft's `.lora_magnitude_vector`, which ComfyUI does
    not read (the same layout as the SD files' `dora_scales`)."""
    lora = _transformer_lora(weights)
    for key in [k for k in lora if k.endswith(DORA_MAGNITUDE)]:
        lora[f"{key.removesuffix(DORA_MAGNITUDE)}.dora_scale"] = lora.pop(key).reshape(-1, 1)
    for module in {k.removesuffix(".lora_A.weight") for k in lora if k.endswith(".lora_A.weight")}:
        lora[f"{module}.alpha"] = torch.tensor(float(weights.lora_alpha))
    return lora


def _webui_files(project, weights: TrainedWeights, out_path: Path, header, sdxl_layers_per_block: int | None):
    from diffusers.utils import convert_state_dict_to_kohya

    if weights.encoder_keys:  # Flux.1, SD 3: ComfyUI maps `transformer.<diffusers name>` keys itself
        # no AUTOMATIC1111 `<lora:...>` to write: A1111 runs neither; ComfyUI loads the file with a LoRA node
        return _single_file_plan(project, weights, out_path, header, flow_single_file(weights), prompt_tag=False)
    # peft keys -> kohya keys (`lora_unet_down_blocks_0_..._to_q.lora_down.weight`). The converter writes
    # alpha = rank (scale 1); the scale trained is lora_alpha / rank, so write the real alpha.
    magnitudes = {k: v for k, v in weights.lora.items() if k.endswith(DORA_MAGNITUDE)}  # DoRA's, done below
    lora = convert_state_dict_to_kohya({f"unet.{k}": v.float() for k, v in weights.lora.items() if k not in magnitudes})
    lora.update(dora_scales(magnitudes))
    if sdxl_layers_per_block is not None:  # SDXL: kohya's SGM block names
        renamed = {}
        for key, value in lora.items():
            module, _, part = key.partition(".")  # "lora_unet_..._to_q", "lora_down.weight"
            renamed[f"{sgm_key(module, sdxl_layers_per_block)}.{part}"] = value
        lora = renamed
    for key in [k for k in lora if k.endswith(".alpha")]:
        lora[key] = torch.tensor(float(weights.lora_alpha))
    return _single_file_plan(project, weights, out_path, header, lora)


def _single_file_plan(project, weights: TrainedWeights, out_path: Path, header, lora: dict, prompt_tag: bool = True):
    """The webui format's files: the single-file LoRA with kohya's header entries, and the embeddings. `prompt_tag`:
    the LoRA's `<lora:NAME:1>`, AUTOMATIC1111's prompt syntax (SD families only)."""
    name = project.config.project.name
    meta = {
        **header,
        "format": "pt",
        # kohya's sd-scripts header entries, which AUTOMATIC1111's and ComfyUI's LoRA browsers display.
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(weights.rank),
        "ss_network_alpha": str(weights.lora_alpha),
        "ss_output_name": name,
        # DoRA: LyCORIS's names for an output-axis weight decomposition (dora_scale (out, 1); dora_scales)
        **({"ss_network_args": json.dumps({"algo": "lora", "dora_wd": True, "wd_on_output": True})}
           if weights.adapter == "dora" else {}),
    }
    plan = [
        (ExportedFile(out_path / f"{name}.safetensors", "lora", None, None, f"<lora:{name}:1>" if prompt_tag else None),
         lora, meta)
    ]
    return plan + _embedding_files(
        weights, out_path, header, lambda token, vector: {"emb_params": vector[None, :]}
    )


def _is_sdxl_embedding(path: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return "clip_g" in set(f.keys())  # a safe_open handle, not a dict


def _is_flow_embedding(path: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return "t5" in set(f.keys()) or "clip_g" not in set(f.keys()) and "clip_l" in set(f.keys())


def summary_table(result: ExportResult):
    """A rich table: each file written and how to use it (cells are plain text, never rich markup)."""
    from rich.table import Table
    from rich.text import Text

    table = Table(
        title=Text(f"exported {result.weights} weights ({result.fmt} format) to {result.out_dir}"),
        title_justify="left",
    )
    table.add_column("file", overflow="fold")
    table.add_column("what")
    table.add_column("in prompts")
    for f in result.files:
        if f.kind == "lora":
            cells = (str(f.path), "LoRA", f.trigger or "")
        else:
            word = f.token if result.fmt == "diffusers" else f.trigger
            cells = (str(f.path), f"embedding of [{f.subject}]", word)
        table.add_row(*map(Text, cells))
    sdxl = any(f.kind == "embedding" and f.path.is_file() and _is_sdxl_embedding(f.path) for f in result.files)
    flow = any(f.kind == "embedding" and f.path.is_file() and _is_flow_embedding(f.path) for f in result.files)
    if flow and result.fmt == "webui":  # Flux.1, SD 3: AUTOMATIC1111 runs neither
        caption = (
            "ComfyUI: the LoRA to models/loras, loaded with a LoraLoader node on the Flux.1 / SD 3 model (it reads "
            "the transformer.* keys; AUTOMATIC1111 cannot run these models, other tools are not checked); the "
            "embedding files hold one row per text encoder (clip_l, t5, and clip_g for SD 3). See docs/flux-sd3.md"
        )
    elif flow:  # Flux.1, SD 3
        caption = (
            "pipe.load_lora_weights(folder); per embedding file, each key's row into its encoder (clip_l: "
            "text_encoder, clip_g: text_encoder_2, t5: Flux's text_encoder_2 / SD 3's text_encoder_3) with "
            "pipe.load_textual_inversion(state[key], token=..., text_encoder=..., tokenizer=...). See docs/flux-sd3.md"
        )
    elif result.fmt == "diffusers" and sdxl:
        caption = (
            "pipe.load_lora_weights(folder); per embedding file: state = load_file(file), then "
            "pipe.load_textual_inversion(state['clip_l'], token=..., text_encoder=pipe.text_encoder, "
            "tokenizer=pipe.tokenizer) and the same with state['clip_g'], text_encoder_2, tokenizer_2. See docs/sdxl.md"
        )
    elif result.fmt == "diffusers":
        caption = (
            "pipe.load_lora_weights(folder); pipe.load_textual_inversion(file, token=...) per embedding. "
            "See docs/render-export.md"
        )
    else:
        caption = (
            "AUTOMATIC1111: LoRA to models/Lora, embeddings to embeddings/. ComfyUI: models/loras and "
            "models/embeddings (prompt: embedding:NAME). See docs/render-export.md"
        )
    table.caption = Text(caption)
    return table
