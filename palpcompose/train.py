"""`palpcompose train`: PALP personalization (arXiv:2401.06105) of a text-to-image model on a project's subjects.

The loop follows docs/method.md ("One training step"). It reads top to bottom:
  validate the project -> resolve and load the base model -> freeze, add tokens and LoRA -> cache latents and
  frozen prompt embeddings -> (resume) -> loop: sample, `training_step`, log, preview, snapshot+checkpoint -> save.
`training_step(state, batch)` is one micro-step with every UNet pass in it, callable on its own (benchmarks).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from palpcompose import __version__, models
from palpcompose.checkpoint import (
    Checkpoint,
    checkpoint_folder,
    load_checkpoint,
    read_settings,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from palpcompose.data import Batch, SubjectData, encode_subject, sample_batch
from palpcompose.errors import Interrupted, ProjectError, UserError, command_line
from palpcompose.fsutil import atomic_save_image, atomic_write_json, atomic_write_text, sha256_file
from palpcompose.guidance import (
    GUIDANCE_MODES,
    GuidanceConfig,
    NonFiniteError,
    PalpGuidance,
    add_noise,
    cfg,
    check_finite,
    predict_x0,
    v_to_eps,
)
from palpcompose.memory import OutOfMemory, estimate_training_memory, out_of_memory_message
from palpcompose.weights import TrainedWeights, save_trained_weights

LORA_WEIGHT_DECAY = 1e-2  # AdamW default of diffusers' LoRA scripts
EMBEDDING_WEIGHT_DECAY = 0.0  # decay would shrink the new tokens' norm away from CLIP's embedding scale
PREVIEW_SEEDS = 2  # columns of a preview grid: the first seeds of [render].seeds
PREVIEW_MAX_STEPS = 25  # sampling steps of a preview (at most; [render].steps when lower)
PREVIEW_TILE = 128  # tiles smaller than this are upscaled (nearest) so tiny models stay visible


@dataclass
class TrainResult:
    status: str  # "completed" | "up_to_date"
    steps_done: int
    out_dir: Path
    weights_dir: Path
    wall_time_s: float = 0.0
    final_losses: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainState:
    """Everything `training_step` needs. Models are the accelerate-prepared ones."""

    accelerator: object
    components: models.Components
    unet: object
    text_encoder: object
    guidance: PalpGuidance
    optimizer: object
    lr_scheduler: object
    lora_params: list
    token_embedding: PlaceholderEmbedding  # the text encoder's table, frozen; `.rows` (n, D) are the trained tokens
    token_ids: dict[str, int]  # "V1" -> row of the table (row i of token_embedding.rows for the i-th subject)
    null_embeds: torch.Tensor  # (1, 77, D) the empty prompt, encoded once
    clean_embeds: torch.Tensor | None  # (1, 77, D) the clean prompt y_c, encoded once (None for guidance none)
    weight_dtype: torch.dtype
    max_grad_norm: float
    lora_layers: list  # the UNet's peft LoRA layers (adapters() toggles only these; empty would leave LoRA on)
    graphs: object = None  # an accel.GraphCache to replay the no-grad guidance passes from CUDA graphs, or None
    graphed_pass: object = None  # an accel.GraphedPersonalizationPass (forward+backward from CUDA graphs), or None


# ---------------------------------------------------------------------------------------------------------------
# Setup


class PlaceholderEmbedding(torch.nn.Module):
    """The text encoder's token-embedding table, frozen, with the subjects' rows trained as their own parameter
    `rows` (n, D) and spliced in at lookup: a position holding a placeholder id reads its trained row.

    Training the whole (V, D) table (49409 x 768 for SD-1.5) and masking its gradient would cost a dense gradient,
    dense AdamW moments (0.4 GiB) and a dense update every step for n useful rows; here the table is never written,
    so every other row stays bit-identical by construction. The placeholder ids are the table's last n rows
    (tokenizer.add_tokens appends them), in subject order.
    """

    def __init__(self, table: torch.nn.Embedding, first_id: int):
        super().__init__()
        self.table = table
        self.first_id = first_id
        self.rows = torch.nn.Parameter(table.weight[first_id:].detach().clone().float())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.table(input_ids)
        row = input_ids - self.first_id  # >= 0 exactly at the placeholder positions
        spliced = F.embedding(row.clamp(min=0), self.rows).to(embeds.dtype)
        return torch.where((row >= 0).unsqueeze(-1), spliced, embeds)

    def full_table(self) -> torch.Tensor:
        """The (V, D) table as the text encoder sees it: the frozen rows, then the trained placeholder rows."""
        return torch.cat([self.table.weight[: self.first_id], self.rows.to(self.table.weight.dtype)])


def train_placeholder_rows(text_encoder, token_ids: dict[str, int]) -> PlaceholderEmbedding:
    """Give the text encoder a PlaceholderEmbedding whose rows (in `token_ids` order) are the trainable tokens."""
    ids = list(token_ids.values())
    table = text_encoder.get_input_embeddings()
    if ids != list(range(table.num_embeddings - len(ids), table.num_embeddings)):
        raise ValueError(f"placeholder token ids {ids} must be the last rows of the embedding table, in order")
    module = PlaceholderEmbedding(table, ids[0])
    text_encoder.set_input_embeddings(module)
    return module


def prepare_state(config, components: models.Components, accelerator, guidance_config: GuidanceConfig,
                  tokens: dict[str, str]) -> TrainState:
    """Freeze the model, add the subjects' tokens and the LoRA, set dtypes, build the optimizer, cache prompts."""
    c, train_cfg = components, config.train
    device = accelerator.device
    # Freeze everything; LoRA weights and the placeholder rows are the only trainable values
    models.freeze(c.unet, c.vae, c.text_encoder)
    init_words = {key: s.init_word or s.class_name for key, s in config.subjects.items()}
    token_ids = models.add_placeholder_tokens(c.tokenizer, c.text_encoder, tokens, init_words)
    token_embedding = train_placeholder_rows(c.text_encoder, token_ids)
    torch.manual_seed(train_cfg.seed)  # LoRA initialisation
    lora_params = models.add_lora(c.unet, train_cfg.lora_rank, train_cfg.lora_alpha or train_cfg.lora_rank)
    if train_cfg.recomputes_activations:
        c.unet.enable_gradient_checkpointing()
    # Frozen weights in the mixed-precision dtype, trainable ones (LoRA, text encoder's table) in fp32
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for module in (c.unet, c.vae):
        module.to(device)
        if weight_dtype != torch.float32:
            module.to(dtype=weight_dtype)
    for p in lora_params:
        p.data = p.data.float()
    c.text_encoder.to(device)
    optimizer = torch.optim.AdamW([
        {"params": lora_params, "lr": train_cfg.learning_rate, "weight_decay": LORA_WEIGHT_DECAY},
        {"params": [token_embedding.rows], "lr": train_cfg.embedding_learning_rate,
         "weight_decay": EMBEDDING_WEIGHT_DECAY},
    ])
    lr_scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(c.unet, c.text_encoder, optimizer, lr_scheduler)
    # Frozen prompts, encoded once: the empty prompt (CFG) and the clean prompt y_c
    with torch.no_grad():
        null_embeds = models.encode_prompt(c.text_encoder, models.tokenize(c.tokenizer, [""])).detach()
        clean_embeds = None
        if guidance_config.mode != "none":
            ids = models.tokenize(c.tokenizer, [config.palp.clean_prompt])
            clean_embeds = models.encode_prompt(c.text_encoder, ids).detach()
    return TrainState(
        accelerator=accelerator, components=c, unet=unet, text_encoder=text_encoder,
        guidance=PalpGuidance(guidance_config), optimizer=optimizer, lr_scheduler=lr_scheduler,
        lora_params=lora_params, token_embedding=token_embedding, token_ids=token_ids, null_embeds=null_embeds,
        clean_embeds=clean_embeds,
        weight_dtype=weight_dtype, max_grad_norm=train_cfg.max_grad_norm, lora_layers=models.lora_layers(c.unet),
    )


def offload_vae(state: TrainState) -> None:
    """train.low_memory: keep the VAE in host memory once the reference latents are cached. Previews bring it back
    for their decode (vae_on_device)."""
    state.components.vae.to("cpu")
    if state.accelerator.device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def vae_on_device(state: TrainState):
    """The VAE on the training device for the duration (previews decode with it); back where it was after."""
    vae, device = state.components.vae, state.accelerator.device
    home = next(vae.parameters()).device
    if home == device:
        yield
        return
    vae.to(device)
    try:
        yield
    finally:
        vae.to(home)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def prepare_subjects(project, config, state: TrainState, tokens: dict[str, str]) -> list[SubjectData]:
    """Encode every reference once (cached latent distributions) and tokenize each subject's y_P."""
    c = state.components
    subjects = []
    for key, subject in config.subjects.items():
        prompt = models.expand_placeholders(subject.prompt or f"A photo of [{key}]", tokens)
        mean, std = encode_subject(c.vae, list(project.images[key]), config.train.resolution, bool(subject.flip),
                                   state.accelerator.device, state.weight_dtype)
        subjects.append(SubjectData(key, models.tokenize(c.tokenizer, [prompt])[0], mean, std,
                                    len(project.images[key]), bool(subject.flip)))
    return subjects


# ---------------------------------------------------------------------------------------------------------------
# One step


@contextlib.contextmanager
def adapters(lora_layers, enabled: bool):
    """G_lora with the adapter on, G_base with it off: the same UNet, no second copy. `lora_layers`: the UNet's
    LoRA layers as models.lora_layers collects them (once: TrainState.lora_layers), or the UNet itself. peft's
    per-layer switch restores the LoRA weights' requires_grad when it turns them back on."""
    if enabled:
        yield
        return
    if isinstance(lora_layers, torch.nn.Module):
        lora_layers = models.lora_layers(lora_layers)
    for layer in lora_layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in lora_layers:
            layer.enable_adapters(True)


def make_denoiser(state: TrainState, timesteps: torch.Tensor, abar_t: torch.Tensor, personal_embeds: torch.Tensor):
    """The `denoise` callable of guidance.PalpGuidance for this step: fp32 eps with CFG, adapter on or off."""
    unet = state.unet  # accelerate's prepared model: the UNet itself (its forward runs under autocast)
    prediction_type = state.components.prediction_type

    def denoise(latents, *, adapter: bool, prompt: str, scale: float) -> torch.Tensor:
        batch = latents.shape[0]
        cond = state.clean_embeds.expand(batch, -1, -1) if prompt == "clean" else personal_embeds
        if scale == 1.0:  # G^1 = G(x, t, y): no unconditional pass
            x, t, embeds, abar = latents, timesteps, cond, abar_t
        else:  # one batched pass for G(x, t, null) and G(x, t, y): (2B, C, H, W)
            x, t, abar = torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), torch.cat([abar_t, abar_t])
            embeds = torch.cat([state.null_embeds.expand(batch, -1, -1), cond])

        def run(x, t, embeds):
            with adapters(state.lora_layers, adapter), state.accelerator.autocast():
                return unet(x, t, embeds).sample

        # accel hook: with state.graphs set, each distinct pass (adapter on/off, shapes) is captured once and replayed
        out = (run(x, t, embeds) if state.graphs is None else state.graphs(run, adapter, x, t, embeds)).float()
        if prediction_type == "v_prediction":
            out = v_to_eps(out, x, abar)
        if scale != 1.0:
            uncond, cond_out = out.chunk(2)
            out = cfg(uncond, cond_out, scale)
        return out

    return denoise


def training_step(state: TrainState, batch: Batch) -> dict[str, float]:
    """One micro-step (method.md steps 2-7): forward, loss, backward, and the optimizer step when gradients sync."""
    acc, c = state.accelerator, state.components
    device = acc.device
    latents, noise = batch.latents.to(device), batch.noise.to(device)
    timesteps = batch.timesteps.to(device)
    abar_t = c.alphas_cumprod.to(device)[timesteps].view(-1, 1, 1, 1)  # (B, 1, 1, 1), the model's own schedule
    with acc.accumulate(state.unet, state.text_encoder):
        with acc.autocast():
            # y_P with the learned token: gradients reach the placeholder rows
            personal_embeds = models.encode_prompt(state.text_encoder, batch.input_ids.to(device))
            noisy_latents = add_noise(latents, noise, abar_t)  # forward diffusion x_t
            if state.graphed_pass is not None:  # accel hook: this pass's forward and backward from CUDA graphs
                model_pred = state.graphed_pass(noisy_latents, timesteps, personal_embeds).float()
            else:
                model_pred = state.unet(noisy_latents, timesteps, personal_embeds).sample.float()
        # Step 2: personalization loss, in the model's own target
        if c.prediction_type == "epsilon":
            target = noise
        elif c.prediction_type == "v_prediction":
            target = abar_t.sqrt() * noise - (1 - abar_t).sqrt() * latents
        else:
            raise ValueError(f"unknown prediction type {c.prediction_type!r}")
        terms = {"loss_pers": F.mse_loss(model_pred, target)}
        loss = terms["loss_pers"]
        if state.guidance.config.mode != "none":
            # Step 3: x0_hat from the eps prediction (Eq. 2), graph kept; steps 4-6 in guidance.PalpGuidance
            eps_hat = model_pred if c.prediction_type == "epsilon" else v_to_eps(model_pred, noisy_latents, abar_t)
            x0_hat = predict_x0(noisy_latents, eps_hat, abar_t)
            denoise = make_denoiser(state, timesteps, abar_t, personal_embeds.detach())
            terms.update(state.guidance(x0_hat=x0_hat, noise=noise, abar_t=abar_t, denoise=denoise,
                                        fresh_noise=batch.fresh_noise.to(device)))
            loss = loss + state.guidance.config.weight * terms["loss_align"]  # step 7
        check_finite("the training loss", loss)
        acc.backward(loss)
        if acc.sync_gradients and state.max_grad_norm > 0:
            acc.clip_grad_norm_(state.lora_params + [state.token_embedding.rows], state.max_grad_norm)
        state.optimizer.step()
        state.lr_scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
    # One device-to-host copy for all the logged values (each float(tensor) would wait for the GPU on its own)
    return dict(zip(terms, torch.stack([v.detach().float() for v in terms.values()]).tolist(), strict=True))


# ---------------------------------------------------------------------------------------------------------------
# Weights, checkpoints, previews


def trained_weights(state: TrainState, config, tokens: dict[str, str], step: int) -> TrainedWeights:
    unet = state.accelerator.unwrap_model(state.unet)
    return TrainedWeights(
        lora=models.lora_state_dict(unet),
        embeddings={tokens[k]: row.detach().float().cpu().clone()
                    for k, row in zip(state.token_ids, state.token_embedding.rows)},
        placeholders=dict(tokens), rank=config.train.lora_rank,
        lora_alpha=float(config.train.lora_alpha or config.train.lora_rank),
        target_modules=list(models.LORA_TARGET_MODULES), base_model=config.project.base_model, step=step,
        guidance=config.palp.guidance,  # the run's mode (train() puts --guidance into config)
    )


def make_checkpoint(state: TrainState, config, tokens, step: int, generator, settings: dict) -> Checkpoint:
    return Checkpoint(
        step=step, weights=trained_weights(state, config, tokens, step), optimizer=state.optimizer.state_dict(),
        lr_scheduler=state.lr_scheduler.state_dict(), rng=rng_state(generator), settings=settings,
    )


def restore_checkpoint(state: TrainState, ckpt: Checkpoint, tokens: dict[str, str], generator) -> None:
    unet = state.accelerator.unwrap_model(state.unet)
    models.load_lora_state_dict(unet, {k: v.to(state.accelerator.device) for k, v in ckpt.weights.lora.items()})
    rows = state.token_embedding.rows
    with torch.no_grad():
        for i, key in enumerate(state.token_ids):
            rows[i] = ckpt.weights.embeddings[tokens[key]].to(rows.device)
    state.optimizer.load_state_dict(ckpt.optimizer)
    state.lr_scheduler.load_state_dict(ckpt.lr_scheduler)
    restore_rng_state(ckpt.rng, generator)


def preview_prompts(config, tokens: dict[str, str]) -> list[tuple[str, str]]:
    """(label, prompt) rows of a preview grid: target prompt, each subject alone, all subjects together."""
    rows = []
    if config.palp.target_prompt:
        rows.append(("target", models.expand_placeholders(config.palp.target_prompt, tokens)))
    for key, subject in config.subjects.items():
        rows.append((key, models.expand_placeholders(subject.prompt or f"A photo of [{key}]", tokens)))
    if len(tokens) > 1:
        rows.append(("together", "a photo of " + " and ".join(tokens[k] for k in config.subjects)))
    return rows


@torch.no_grad()
def render_preview(state: TrainState, config, tokens: dict[str, str], step: int, folder: Path) -> Path:
    """One grid PNG (rows: prompts, then the x0-hat diagnostic; columns: fixed seeds) plus a JSON legend.

    Runs under forked RNG with its own seeded generators, and casts nothing: training is unaffected.
    """
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    acc, c = state.accelerator, state.components
    unet = acc.unwrap_model(state.unet)
    text_encoder = acc.unwrap_model(state.text_encoder)
    pipe = StableDiffusionPipeline(
        vae=c.vae, text_encoder=text_encoder, tokenizer=c.tokenizer, unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(c.inference_scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    seeds = list(config.render.seeds[:PREVIEW_SEEDS]) or [0]
    res = config.train.resolution
    rows = preview_prompts(config, tokens)
    grid_rows: list[tuple[str, list]] = []
    cuda_devices = [acc.device] if acc.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices), acc.autocast(), vae_on_device(state):
        for label, prompt in rows:
            images = [
                pipe(prompt, height=res, width=res, num_inference_steps=min(config.render.steps, PREVIEW_MAX_STEPS),
                     guidance_scale=config.render.guidance_scale,
                     generator=torch.Generator("cpu").manual_seed(seed)).images[0]
                for seed in seeds
            ]
            grid_rows.append((label, images))
        # Fig. 5 diagnostic: x0_hat from pure noise at t = T - 1 for the target prompt, base model vs current
        if config.palp.target_prompt:
            class_prompt = models.expand_placeholders(
                config.palp.target_prompt, {k: s.class_name for k, s in config.subjects.items()})
            current_prompt = models.expand_placeholders(config.palp.target_prompt, tokens)
            for label, prompt, adapter in (("x0 base", class_prompt, False), ("x0 now", current_prompt, True)):
                grid_rows.append((label, [_x0_image(state, pipe, prompt, adapter, seed, res, config.render.guidance_scale)
                                         for seed in seeds]))
    path = folder / f"step-{step:06d}.png"
    atomic_save_image(path, _grid(grid_rows))
    legend = [[label, prompt] for label, prompt in rows]  # top to bottom
    if config.palp.target_prompt:
        legend.append(["x0 base", f"x0-hat at t=T-1, base model (adapter off), {class_prompt!r}"])
        legend.append(["x0 now", f"x0-hat at t=T-1, current weights, {current_prompt!r}"])
    atomic_write_json(path.with_suffix(".json"), {"step": step, "seeds": seeds, "rows": legend})
    return path


def _x0_image(state: TrainState, pipe, prompt: str, adapter: bool, seed: int, res: int, scale: float):
    c = state.components
    device = state.accelerator.device
    t_last = c.noise_scheduler.config.num_train_timesteps - 1
    latent_res = res // pipe.vae_scale_factor
    latents = torch.randn((1, c.unet.config.in_channels, latent_res, latent_res),
                          generator=torch.Generator("cpu").manual_seed(seed)).to(device)
    ids = models.tokenize(c.tokenizer, [prompt])
    cond = models.encode_prompt(state.accelerator.unwrap_model(state.text_encoder), ids)
    abar = c.alphas_cumprod[t_last].to(device).view(1, 1, 1, 1)
    timesteps = torch.full((1,), t_last, device=device, dtype=torch.long)
    unet = state.accelerator.unwrap_model(state.unet)
    embeds = torch.cat([state.null_embeds, cond])
    with adapters(state.lora_layers, adapter):
        out = unet(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), embeds).sample.float()
    if c.prediction_type == "v_prediction":
        out = v_to_eps(out, torch.cat([latents, latents]), abar)
    uncond, cond_out = out.chunk(2)
    x0_hat = predict_x0(latents, cfg(uncond, cond_out, scale), abar)
    image = c.vae.decode(x0_hat / c.vae.config.scaling_factor).sample.float()
    return pipe.image_processor.postprocess(image, output_type="pil")[0]


def _grid(rows: list[tuple[str, list]]):
    from PIL import Image, ImageDraw

    tile = max(PREVIEW_TILE, rows[0][1][0].width)
    label_w = 90
    cols = max(len(images) for _, images in rows)
    grid = Image.new("RGB", (label_w + cols * tile, len(rows) * tile), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        draw.text((4, r * tile + tile // 2 - 6), label, fill="black")
        for col, image in enumerate(images):
            grid.paste(image.resize((tile, tile), Image.Resampling.NEAREST), (label_w + col * tile, r * tile))
    return grid


def plot_losses(log: list[dict], path: Path) -> None:
    """out/logs/loss.png: loss_pers and loss_align against the step, one panel each (Pillow only)."""
    from PIL import Image, ImageDraw

    keys = [k for k in ("loss_pers", "loss_align") if any(k in e for e in log)]
    width, panel, pad = 640, 220, 40
    image = Image.new("RGB", (width, panel * max(len(keys), 1)), "white")
    draw = ImageDraw.Draw(image)
    for p, key in enumerate(keys):
        points = [(e["step"], e[key]) for e in log if key in e]
        top = p * panel
        lo, hi = min(v for _, v in points), max(v for _, v in points)
        span = (hi - lo) or 1.0
        first, last = min(s for s, _ in points), max(s for s, _ in points)
        xy = [(pad + (s - first) / max(last - first, 1) * (width - 2 * pad), top + panel - pad - (v - lo) / span * (panel - 2 * pad))
              for s, v in points]
        draw.rectangle((pad, top + pad, width - pad, top + panel - pad), outline="grey")
        if len(xy) > 1:
            draw.line(xy, fill="navy", width=2)
        draw.text((pad, top + 10), f"{key}  (min {lo:.4g}, max {hi:.4g}, last step {last})", fill="black")
    atomic_save_image(path, image)


# ---------------------------------------------------------------------------------------------------------------
# Bookkeeping: lock, identity, manifest


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_lock(lock: Path) -> dict | None:
    """The live lock's content, or None when there is no lock or it is stale (its process is gone)."""
    try:
        info = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    if info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1))):
        return None
    return info


def _lock_error(lock: Path, info: dict) -> UserError:
    return UserError(
        f"{lock}: this project is already training (pid {info.get('pid')} on {info.get('host')}, started "
        f"{info.get('started_at')}); wait for it, or stop it. If no such run exists, delete the lock file"
    )


def acquire_lock(lock: Path) -> None:
    lock.parent.mkdir(parents=True, exist_ok=True)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": _now()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            live = _read_lock(lock)
            if live is not None:
                raise _lock_error(lock, live) from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        return
    raise UserError(f"{lock}: could not take the training lock; delete the file if no run is active")


def base_model_identity(source: models.BaseModelSource) -> str:
    """Hub revision, sha256 of a single file, or sha256 over a folder's weight files (path + file hash)."""
    if source.kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(source.location, "model_index.json")
        return f"revision:{Path(hit).parent.name}" if isinstance(hit, str) else "revision:unknown"
    if source.kind == "single_file":
        return f"sha256:{sha256_file(source.location)}"
    import hashlib

    folder = Path(source.location)
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin", ".ckpt", ".pt")):
        h.update(f"{path.relative_to(folder).as_posix()}:{sha256_file(path)}\n".encode())
    return f"sha256:{h.hexdigest()}"


def _git(root: Path) -> dict | None:
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=False,
                                timeout=10)
        if commit.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "."], check=False, capture_output=True,
                                text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _resume_settings(config, guidance: str) -> dict:
    """What a resumed run must share with the run it continues: everything that changes the weights but steps."""
    data = config.to_dict()
    del data["render"]
    # gradient_checkpointing (and low_memory: that plus where the VAE waits) changes no result: switching either on
    # to fit in memory resumes
    for key in ("steps", "save_every", "preview_every", "gradient_checkpointing", "low_memory"):
        del data["train"][key]
    data["palp"]["guidance"] = guidance
    data["project"].pop("allow_pickle", None)  # a permission, not a setting of the run
    return data


def _choose_mixed_precision(requested: str) -> tuple[str, str]:
    """bf16/fp16 on accelerators; fp32 on the CPU (CPU autocast is slow, and fp32 keeps runs bit-reproducible)."""
    if requested != "no" and not (torch.cuda.is_available() or torch.backends.mps.is_available()):
        return "no", f"mixed_precision: {requested} -> no (CPU: training runs in fp32)"
    return requested, ""


def _install_signal_handlers(stop: dict):
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second Ctrl-C stops at once."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):
        if stop.get("signal") is not None:
            raise KeyboardInterrupt
        stop["signal"] = signum

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    return previous


# ---------------------------------------------------------------------------------------------------------------
# The command


def train(project, *, steps: int | None = None, resume: bool = False, guidance: str | None = None,
          force: bool = False, console: Console | None = None) -> TrainResult:
    """Train the project's subjects. `project` is a Project or a project folder. See docs/training.md."""
    from accelerate import Accelerator

    from palpcompose.project import config_prompts, load_project, too_long_problems

    console = console or Console()
    t0 = time.monotonic()
    # Validate everything before writing anything: project, overrides, base model, lock, checkpoint
    if not hasattr(project, "config"):
        project = load_project(project)
    config = project.config
    if guidance is not None and guidance not in GUIDANCE_MODES:
        raise UserError(f"--guidance must be one of {', '.join(GUIDANCE_MODES)}, not {guidance!r}")
    if steps is not None and steps < 1:
        raise UserError(f"--steps must be at least 1, not {steps}")
    mode = guidance or config.palp.guidance
    if mode != "none" and not (config.palp.target_prompt and config.palp.clean_prompt):
        raise UserError(f"{project.file}: guidance {mode!r} needs palp.target_prompt and palp.clean_prompt; set "
                        "both, or use --guidance none")
    # palp.toml as written: render compares it with the file later, whatever --steps/--guidance overrode here
    file_hashes = {"config": config.to_dict(), "config_hash": config.hash(), "training_hash": config.training_hash()}
    config = replace(config, palp=replace(config.palp, guidance=mode),
                     train=replace(config.train, steps=steps or config.train.steps))
    steps_target = config.train.steps
    steps_option = f" --steps {steps_target}" if steps is not None else ""
    resume_command = command_line("palpcompose", "train", project.root, "--resume") + steps_option  # for interrupts
    out = project.root / "out"
    manifest_path, lock_path = out / "manifest.json", out / "train.lock"
    source = models.resolve_base_model(config.project.base_model, project.root, config.project.allow_pickle)
    if not source.available:
        raise UserError(f"project.base_model: {source.detail}")
    identity = base_model_identity(source)
    images = {p.relative_to(project.root).as_posix(): sha256_file(p)
              for key in config.subjects for p in project.images[key]}
    previous = _read_json(manifest_path)
    if (not force and not resume and previous and previous.get("status") == "completed"
            and previous.get("training_hash") == config.training_hash() and previous.get("images") == images
            and previous.get("base_model", {}).get("identity") == identity
            and (out / "weights" / "final" / "lora.safetensors").is_file()):
        console.print(f"weights are up to date ({out / 'weights' / 'final'}); use --force to retrain")
        return TrainResult("up_to_date", previous.get("steps_done", 0), out, out / "weights" / "final")
    live = _read_lock(lock_path)
    if live is not None:
        raise _lock_error(lock_path, live)
    settings = _resume_settings(config, mode)
    resume_from = None
    if resume:
        resume_from = checkpoint_folder(out / "checkpoint")
        if resume_from is None:
            raise UserError(f"{out / 'checkpoint'}: nothing to resume; run `palpcompose train` without --resume")
        state_json = read_settings(resume_from)
        saved = state_json["settings"]
        if saved != settings:
            changed = [(f"{section}.{key}", saved.get(section, {}).get(key), values[key])
                       for section, values in settings.items() for key in values
                       if saved.get(section, {}).get(key) != values[key]]
            listed = "; ".join(f"{key} was {then!r}, now {now!r}" for key, then, now in changed) or "the subjects"
            old_guidance = saved.get("palp", {}).get("guidance")
            how = (f"pass --guidance {old_guidance} again" if any(k == "palp.guidance" for k, _, _ in changed)
                   and len(changed) == 1 else "restore them in palp.toml (or the --guidance of that run)")
            raise UserError(f"{project.file}: the checkpoint was trained with other settings ({listed}); {how} to "
                            "resume, or train without --resume to start over")
        if steps_target < state_json["step"]:
            asked = f"--steps {steps_target}" if steps is not None else f"{project.file}: train.steps = {steps_target}"
            raise UserError(f"{asked}: the checkpoint is already at step {state_json['step']}; resume with --steps "
                            f"{state_json['step']} or more, or train without --resume to start over")
    mixed_precision, precision_notice = _choose_mixed_precision(config.train.mixed_precision)
    try:
        components = models.load_components(source)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"project.base_model: {config.project.base_model!r} could not be loaded "
                        f"({type(exc).__name__}: {exc}); point it at a diffusers folder, a .safetensors file, "
                        "a cached hub id or builtin:toy") from exc
    too_long = too_long_problems(project.file, components.tokenizer, config_prompts(config))
    if too_long:  # as `check` says: the text encoder would silently cut them off
        raise ProjectError(too_long)

    acquire_lock(lock_path)
    stop: dict = {}
    previous_handlers = _install_signal_handlers(stop)
    started_at = _now()
    tokens = models.placeholder_tokens(config.project.name, config.subjects)
    manifest = {
        "palpcompose_version": __version__, "status": "running",
        "base_model": {"spec": source.spec, "kind": source.kind, "identity": identity},
        "config": config.to_dict(), "config_hash": config.hash(), "training_hash": config.training_hash(),
        "palp_toml": file_hashes,
        "images": images, "tokens": tokens, "git": _git(project.root), "steps_done": 0,
        "steps_target": steps_target, "guidance": mode, "wall_time_s": 0.0, "device": "", "started_at": started_at,
        "finished_at": None,
    }
    step, checkpoint_step, estimate = 0, None, None
    ours = False  # until this run writes its manifest, the one on disk (if any) is the previous run's: leave it be
    try:
        accelerator = Accelerator(mixed_precision=mixed_precision,
                                  gradient_accumulation_steps=config.train.gradient_accumulation_steps)
        manifest["device"] = _device_name(accelerator.device)
        for notice in (precision_notice, models.set_attention(components.unet, config.train.attention,
                                                                accelerator.device.type)):
            if notice:
                console.print(notice)
        state = prepare_state(config, components, accelerator, GuidanceConfig.from_palp(config.palp, mode), tokens)
        if accelerator.device.type == "cuda":
            estimate = estimate_training_memory(
                components.unet, components.vae, components.text_encoder,
                state.lora_params + [state.token_embedding.rows], resolution=config.train.resolution,
                batch_size=config.train.batch_size, half_precision=state.weight_dtype != torch.float32,
                gradient_checkpointing=config.train.recomputes_activations,
                vae_on_device=not config.train.low_memory)
            total = torch.cuda.get_device_properties(accelerator.device).total_memory / 2**30
            console.print(f"{estimate.describe()}; this GPU has {total:.1f} GiB")
        subjects = prepare_subjects(project, config, state, tokens)
        if config.train.low_memory:
            offload_vae(state)  # the latents are cached: the step never uses the VAE again
        generator = torch.Generator("cpu").manual_seed(config.train.seed + accelerator.process_index)
        step, log = 0, []
        if resume_from is not None:
            ckpt = load_checkpoint(resume_from)
            restore_checkpoint(state, ckpt, tokens, generator)
            step = checkpoint_step = ckpt.step
            old = _read_json(manifest_path) or {}
            manifest["started_at"] = old.get("started_at", started_at)
            log = [e for e in _read_jsonl(out / "logs" / "train.jsonl") if e["step"] <= step]
            console.print(f"resuming at step {step} of {steps_target}")
        else:
            if previous and previous.get("steps_done"):
                console.print(f"starting over: the earlier run ({previous.get('status')}, {previous['steps_done']} "
                              f"steps) is replaced; `--resume` continues a run instead")
            for stale in ("snapshots", "previews", "logs", "checkpoint", "weights"):
                _remove_tree(out / stale)  # outputs of an earlier run would be mistaken for this one's
        prior_wall = float((_read_json(manifest_path) or {}).get("wall_time_s", 0.0)) if resume_from else 0.0
        manifest["steps_done"] = step
        atomic_write_json(manifest_path, manifest)
        ours = True  # from here on out/manifest.json is this run's
        last_snapshot = None

        def save_all(at_step: int, status: str) -> None:
            nonlocal checkpoint_step
            save_checkpoint(out / "checkpoint", make_checkpoint(state, config, tokens, at_step, generator, settings))
            checkpoint_step = at_step
            atomic_write_text(out / "logs" / "train.jsonl", "".join(json.dumps(e) + "\n" for e in log))
            manifest.update(status=status, steps_done=at_step, wall_time_s=round(prior_wall + time.monotonic() - t0, 3))
            atomic_write_json(manifest_path, manifest)

        # The loop: sample -> step -> log -> preview -> snapshot + checkpoint
        losses: dict[str, float] = {}
        with _progress(console) as progress:
            task = progress.add_task("training", total=steps_target, completed=step, losses="")
            while step < steps_target:
                for _ in range(config.train.gradient_accumulation_steps):
                    batch = sample_batch(subjects, generator, config.train.batch_size,
                                         components.noise_scheduler.config.num_train_timesteps)
                    try:
                        losses = training_step(state, batch)
                    except NonFiniteError as exc:
                        manifest.update(status="failed", steps_done=step, finished_at=_now(),
                                        wall_time_s=round(prior_wall + time.monotonic() - t0, 3))
                        atomic_write_json(manifest_path, manifest)
                        kept = f"the last good snapshot is {last_snapshot}" if last_snapshot else "no snapshot yet"
                        raise NonFiniteError(f"stopped at step {step + 1}: {exc}. {kept}; the last checkpoint in "
                                             f"{out / 'checkpoint'} is untouched") from None
                step += 1
                log.append({"step": step, **{k: round(v, 6) for k, v in losses.items()},
                            "lr": state.optimizer.param_groups[0]["lr"], "time_s": round(time.monotonic() - t0, 3)})
                progress.update(task, completed=step, losses="  ".join(f"{k} {v:.4f}" for k, v in losses.items()
                                                                     if k.startswith("loss_")))
                if config.train.preview_every and step % config.train.preview_every == 0:
                    render_preview(state, config, tokens, step, out / "previews")
                if config.train.save_every and step % config.train.save_every == 0 and step < steps_target:
                    last_snapshot = out / "snapshots" / f"step-{step:06d}"
                    save_trained_weights(last_snapshot, trained_weights(state, config, tokens, step))
                    save_all(step, "running")
                if stop.get("signal") is not None and step < steps_target:
                    save_all(step, "interrupted")
                    raise Interrupted(
                        f"interrupted at step {step} of {steps_target}; a checkpoint was written. Resume with: "
                        f"{resume_command}")

        # Final weights (and the snapshot of the last step), checkpoint, log, plot, manifest
        final = trained_weights(state, config, tokens, step)
        save_trained_weights(out / "weights" / "final", final)
        if config.train.save_every:
            save_trained_weights(out / "snapshots" / f"step-{step:06d}", final)
        manifest["finished_at"] = _now()
        save_all(step, "completed")
        if log:
            plot_losses(log, out / "logs" / "loss.png")
        result = TrainResult("completed", step, out, out / "weights" / "final", manifest["wall_time_s"],
                             {k: v for k, v in losses.items()})
        _summary(console, result, log, mode)
        return result
    except torch.OutOfMemoryError:
        if ours:
            manifest.update(status="failed", finished_at=_now())
            atomic_write_json(manifest_path, manifest)
        raise OutOfMemory(out_of_memory_message(config, mixed_precision, manifest["device"], step, checkpoint_step,
                                                out / "checkpoint", estimate)) from None
    except KeyboardInterrupt:  # a second Ctrl-C (the first one stops after the step): at once, no new checkpoint
        again = resume_command if resume_from else command_line("palpcompose", "train", project.root) + steps_option
        if not ours:  # still setting up: nothing of the previous run was touched
            raise Interrupted(f"interrupted before training started; nothing was changed. Run again with: {again}"
                              ) from None
        manifest.update(status="interrupted", steps_done=checkpoint_step or 0, finished_at=_now())
        atomic_write_json(manifest_path, manifest)
        if checkpoint_step is None:
            raise Interrupted(f"stopped at once at step {step} of {steps_target} (second interrupt), before the "
                              f"first checkpoint; run `{command_line('palpcompose', 'train', project.root)}` again"
                              ) from None
        raise Interrupted(
            f"stopped at once at step {step} of {steps_target} (second interrupt); the last checkpoint is at step "
            f"{checkpoint_step}. Resume with: {resume_command}") from None
    except BaseException:
        if ours and manifest["status"] == "running":
            manifest.update(status="failed", finished_at=_now())
            atomic_write_json(manifest_path, manifest)
        raise
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        lock_path.unlink(missing_ok=True)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _remove_tree(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path)


class _RateColumn(TextColumn):
    def __init__(self):
        super().__init__("")

    def render(self, task):
        from rich.text import Text

        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} steps/s" if speed else "- steps/s")


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[losses]}"), _RateColumn(), TimeElapsedColumn(), TextColumn("ETA"),
        TimeRemainingColumn(), console=console,
    )


def _summary(console: Console, result: TrainResult, log: list[dict], mode: str) -> None:
    table = Table(title="training summary", show_header=False)
    table.add_row("guidance", mode)
    table.add_row("steps", str(result.steps_done))
    table.add_row("wall time", f"{result.wall_time_s:.1f} s")
    # One step's loss is noise (t and the image are drawn at random each step): compare means over windows
    for key in (k for k in result.final_losses if k.startswith("loss_")):
        values = [e[key] for e in log if key in e]
        if not values:
            continue
        n = max(1, min(50, len(values) // 4))
        last, first = sum(values[-n:]) / n, sum(values[:n]) / n
        table.add_row(key, f"{last:.4f} (mean of the last {n} step{'s' if n > 1 else ''}; first {n}: {first:.4f})")
    table.add_row("weights", str(result.weights_dir))
    if (result.out_dir / "previews").is_dir():
        table.add_row("previews", str(result.out_dir / "previews"))
    table.add_row("log", str(result.out_dir / "logs" / "train.jsonl"))
    console.print(table)
