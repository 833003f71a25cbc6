"""`palpcompose train`: PALP personalization (arXiv:2401.06105) of a text-to-image model on a project's subjects.

`train()` reads top to bottom: plan (run.make_plan: every check, nothing written) -> lock (run.TrainingLock) ->
setup (load and freeze the base model, add tokens and LoRA, cache latents and frozen prompt embeddings, restore a
checkpoint) -> loop (sample, `training_step`, log, preview, snapshot + checkpoint) -> finish (final weights,
summary). Everything written to out/ goes through run.RunRecord. The step follows docs/method.md ("One training
step"); `training_step(state, batch)` is one micro-step with every UNet pass in it, callable on its own (benchmarks).
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from palpcompose import __version__, distributed, models
from palpcompose.checkpoint import Checkpoint, restore_rng_state, rng_state
from palpcompose.conditioning import Conditioning, size_conditioning
from palpcompose.data import Batch, SubjectData, encode_subject, sample_batch
from palpcompose.errors import Interrupted, ProjectError, UserError, command_line
from palpcompose.fsutil import atomic_save_image
from palpcompose.guidance import (
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
from palpcompose.run import LOCK_FILE, Plan, RunRecord, TrainingLock, git_state, make_plan, now
from palpcompose.weights import TrainedWeights

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
    null_cond: Conditioning  # (1, 77, D) the empty prompt, encoded once (SDXL: with its pooled embedding)
    clean_cond: Conditioning | None  # the clean prompt y_c, encoded once (None for guidance none)
    weight_dtype: torch.dtype
    max_grad_norm: float
    lora_layers: list  # the UNet's peft LoRA layers (adapters() toggles only these; empty would leave LoRA on)
    graphs: object = None  # an accel.GraphCache to replay the no-grad guidance passes from CUDA graphs, or None
    graphed_pass: object = None  # an accel.GraphedPersonalizationPass (forward+backward from CUDA graphs), or None
    time_ids: torch.Tensor | None = None  # SDXL's size conditioning (1, 6) at train.resolution; None for SD 1/2

    @property
    def null_embeds(self) -> torch.Tensor:
        return self.null_cond.embeds

    @property
    def clean_embeds(self) -> torch.Tensor | None:
        return None if self.clean_cond is None else self.clean_cond.embeds


# ---------------------------------------------------------------------------------------------------------------
# Setup


class PlaceholderEmbedding(torch.nn.Module):
    """The text encoder's token-embedding table, frozen, with the subjects' rows trained as their own parameter
    `rows` (n, D) and spliced in at lookup: a position holding a placeholder id reads its trained row.

    Training the whole (V, D) table (49409 x 768 for SD-1.5) and masking its gradient would cost a dense gradient,
    dense AdamW moments (0.4 GiB) and a dense update every step for n useful rows; here the table is never written,
    so every other row stays bit-identical by construction. The placeholder ids are the table's last n rows
    (tokenizer.add_tokens appends them), in subject order.

    SDXL: one `rows` parameter (n, D1 + D2) holds each token's embedding in both encoders, [CLIP-L | OpenCLIP-G];
    each encoder's PlaceholderEmbedding reads its own `columns` of it (train_placeholder_rows_sdxl).
    """

    def __init__(self, table: torch.nn.Embedding, first_id: int, rows: torch.nn.Parameter | None = None,
                 columns: slice | None = None):
        super().__init__()
        self.table = table
        self.first_id = first_id
        self.rows = torch.nn.Parameter(table.weight[first_id:].detach().clone().float()) if rows is None else rows
        self.columns = columns  # None: all of `rows`

    def own_rows(self) -> torch.Tensor:
        return self.rows if self.columns is None else self.rows[:, self.columns]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.table(input_ids)
        row = input_ids - self.first_id  # >= 0 exactly at the placeholder positions
        spliced = F.embedding(row.clamp(min=0), self.own_rows()).to(embeds.dtype)
        return torch.where((row >= 0).unsqueeze(-1), spliced, embeds)

    def full_table(self) -> torch.Tensor:
        """The (V, D) table as the text encoder sees it: the frozen rows, then the trained placeholder rows."""
        return torch.cat([self.table.weight[: self.first_id], self.own_rows().to(self.table.weight.dtype)])


def train_placeholder_rows(text_encoder, token_ids: dict[str, int], rows: torch.nn.Parameter | None = None,
                           columns: slice | None = None) -> PlaceholderEmbedding:
    """Give the text encoder a PlaceholderEmbedding whose rows (in `token_ids` order) are the trainable tokens."""
    ids = list(token_ids.values())
    table = text_encoder.get_input_embeddings()
    if ids != list(range(table.num_embeddings - len(ids), table.num_embeddings)):
        raise ValueError(f"placeholder token ids {ids} must be the last rows of the embedding table, in order")
    module = PlaceholderEmbedding(table, ids[0], rows, columns)
    text_encoder.set_input_embeddings(module)
    return module


def add_trained_tokens(c: models.Components, tokens: dict[str, str],
                       init_words: dict[str, str]) -> tuple[dict[str, int], PlaceholderEmbedding]:
    """Each subject's new token in every tokenizer and text encoder, initialised from its init word in each; returns
    the first tokenizer's ids and the PlaceholderEmbedding whose `.rows` are the trained values. SDXL: `.rows`
    (n, D1 + D2) is shared by both encoders' PlaceholderEmbeddings, each reading its own columns."""
    pairs = list(zip(c.tokenizers, c.text_encoders, strict=True))
    ids = [models.add_placeholder_tokens(tok, enc, tokens, init_words) for tok, enc in pairs]
    if len(pairs) == 1:
        return ids[0], train_placeholder_rows(pairs[0][1], ids[0])
    tables = [enc.get_input_embeddings().weight for _, enc in pairs]
    first = [next(iter(i.values())) for i in ids]
    rows = torch.nn.Parameter(torch.cat([t[f:].detach() for t, f in zip(tables, first)], dim=1).float().clone())
    width = tables[0].shape[1]
    embeddings = [train_placeholder_rows(enc, i, rows, cols)
                  for (_, enc), i, cols in zip(pairs, ids, (slice(0, width), slice(width, None)))]
    return ids[0], embeddings[0]


def prepare_state(config, components: models.Components, accelerator, guidance_config: GuidanceConfig,
                  tokens: dict[str, str]) -> TrainState:
    """Freeze the model, add the subjects' tokens and the LoRA, set dtypes, build the optimizer, cache prompts."""
    c, train_cfg = components, config.train
    device = accelerator.device
    # Freeze everything; LoRA weights and the placeholder rows are the only trainable values
    models.freeze(c.unet, c.vae, c.text_encoder)
    init_words = {key: s.init_word or s.class_name for key, s in config.subjects.items()}
    token_ids, token_embedding = add_trained_tokens(c, tokens, init_words)
    torch.manual_seed(train_cfg.seed)  # LoRA initialisation
    lora_params = models.add_lora(c.unet, train_cfg.lora_rank, train_cfg.lora_alpha or train_cfg.lora_rank)
    if train_cfg.recomputes_activations:
        c.unet.enable_gradient_checkpointing()
    # Frozen weights in the mixed-precision dtype, trainable ones (LoRA, text encoder's table) in fp32
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    # (SDXL's VAE overflows in fp16, its config says force_upcast: under fp16 it stays fp32, as its pipeline does)
    vae_fp32 = c.tokenizer_2 is not None and weight_dtype == torch.float16 and c.vae.config.get("force_upcast", True)
    for module in (c.unet, c.vae):
        module.to(device)
        if weight_dtype != torch.float32 and not (module is c.vae and vae_fp32):
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
    # Several processes: the LoRA weights (UNet) and the placeholder rows (text encoder) average their gradients
    distributed.check_all_reduced(accelerator, [unet, text_encoder], lora_params + [token_embedding.rows])
    # Frozen prompts, encoded once: the empty prompt (CFG) and the clean prompt y_c (SDXL: with pooled embeddings;
    # its empty prompt is zeros when the model says so, as its sampler uses it)
    with torch.no_grad():
        null_cond = models.encode_prompt(c.text_encoder, models.tokenize(c.tokenizer, [""], c.tokenizer_2)).detach()
        if c.force_zeros_for_empty_prompt:
            null_cond = null_cond.zeros_like()
        clean_cond = None
        if guidance_config.mode != "none":
            ids = models.tokenize(c.tokenizer, [config.palp.clean_prompt], c.tokenizer_2)
            clean_cond = models.encode_prompt(c.text_encoder, ids).detach()
    time_ids = size_conditioning(train_cfg.resolution).to(device) if c.tokenizer_2 is not None else None
    return TrainState(
        accelerator=accelerator, components=c, unet=unet, text_encoder=text_encoder,
        guidance=PalpGuidance(guidance_config), optimizer=optimizer, lr_scheduler=lr_scheduler,
        lora_params=lora_params, token_embedding=token_embedding, token_ids=token_ids, null_cond=null_cond,
        clean_cond=clean_cond, weight_dtype=weight_dtype, max_grad_norm=train_cfg.max_grad_norm,
        lora_layers=models.lora_layers(c.unet), time_ids=time_ids,
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
                                   state.accelerator.device, c.vae.dtype)
        subjects.append(SubjectData(key, models.tokenize(c.tokenizer, [prompt], c.tokenizer_2)[0], mean, std,
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


def make_denoiser(state: TrainState, timesteps: torch.Tensor, abar_t: torch.Tensor, personal: Conditioning):
    """The `denoise` callable of guidance.PalpGuidance for this step: fp32 eps with CFG, adapter on or off."""
    unet = state.unet  # accelerate's prepared model: the UNet itself (its forward runs under autocast)
    prediction_type = state.components.prediction_type

    def denoise(latents, *, adapter: bool, prompt: str, scale: float) -> torch.Tensor:
        batch = latents.shape[0]
        cond = state.clean_cond.expand(batch) if prompt == "clean" else personal
        if scale == 1.0:  # G^1 = G(x, t, y): no unconditional pass
            x, t, both, abar = latents, timesteps, cond, abar_t
        else:  # one batched pass for G(x, t, null) and G(x, t, y): (2B, C, H, W)
            x, t, abar = torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), torch.cat([abar_t, abar_t])
            both = Conditioning.cat([state.null_cond.expand(batch), cond])

        def run(x, t, embeds, pooled=None):
            with adapters(state.lora_layers, adapter), state.accelerator.autocast():
                return models.unet_forward(unet, x, t, Conditioning(embeds, pooled), state.time_ids)

        # accel hook: with state.graphs set, each distinct pass (adapter on/off, shapes) is captured once and replayed
        inputs = (x, t, both.embeds) + (() if both.pooled is None else (both.pooled,))
        out = (run(*inputs) if state.graphs is None else state.graphs(run, adapter, *inputs)).float()
        if prediction_type == "v_prediction":
            out = v_to_eps(out, x, abar)
        if scale != 1.0:
            uncond, cond_out = out.chunk(2)
            out = cfg(uncond, cond_out, scale)
        return out

    return denoise


def gradient_norms(terms: dict[str, torch.Tensor], weight: float, model_pred: torch.Tensor) -> dict[str, torch.Tensor]:
    """The balance of the two loss terms as the UNet's prediction sees it (logged per step in train.jsonl):
    `grad_pers` = ||d L_pers / d pred||, `grad_align` = ||d (lambda * L_align) / d pred|| (L2 over the whole
    micro-batch, in the model's own parameterisation: eps or v). Both terms reach the trained weights only through
    `pred`, so their ratio is the ratio of their pulls on it. Only the small graph from `pred` to the losses is
    traversed (not the UNet): about the cost of a few elementwise ops."""
    norms = {}
    for name, term, scale in (("grad_pers", terms["loss_pers"], 1.0), ("grad_align", terms.get("loss_align"), weight)):
        if term is not None and term.requires_grad:
            (grad,) = torch.autograd.grad(term, model_pred, retain_graph=True)
            norms[name] = grad.float().norm() * scale
    return norms


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
            personal = models.encode_prompt(state.text_encoder, batch.input_ids.to(device))  # SDXL: + pooled
            noisy_latents = add_noise(latents, noise, abar_t)  # forward diffusion x_t
            if state.graphed_pass is not None:  # accel hook: this pass's forward and backward from CUDA graphs
                added = () if personal.pooled is None else (personal.pooled, state.time_ids)
                model_pred = state.graphed_pass(noisy_latents, timesteps, personal.embeds, *added).float()
            else:
                model_pred = models.unet_forward(state.unet, noisy_latents, timesteps, personal,
                                                 state.time_ids).float()
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
            denoise = make_denoiser(state, timesteps, abar_t, personal.detach())
            terms.update(state.guidance(x0_hat=x0_hat, noise=noise, abar_t=abar_t, denoise=denoise,
                                        fresh_noise=batch.fresh_noise.to(device)))
            loss = loss + state.guidance.config.weight * terms["loss_align"]  # step 7
        terms.update(gradient_norms(terms, state.guidance.config.weight, model_pred))
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
        text_encoder_dims=tuple(enc.get_input_embeddings().table.weight.shape[1]
                                for enc in state.components.text_encoders) if state.components.tokenizer_2 else (),
    )


def make_checkpoint(state: TrainState, config, tokens, step: int, generator, settings: dict) -> Checkpoint:
    """The training state at `step`. Collective: every process calls it (each one's RNG states are gathered);
    weights and optimizer state are the same on all of them."""
    return Checkpoint(
        step=step, weights=trained_weights(state, config, tokens, step), optimizer=state.optimizer.state_dict(),
        lr_scheduler=state.lr_scheduler.state_dict(), rng=distributed.gather(state.accelerator, rng_state(generator)),
        settings=settings,
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
    restore_rng_state(ckpt.rng[state.accelerator.process_index], generator)


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
def render_preview(state: TrainState, config, tokens: dict[str, str], step: int, record: RunRecord) -> Path:
    """One grid PNG (rows: prompts, then the x0-hat diagnostic; columns: fixed seeds) plus a JSON legend, written
    by `record` into out/previews/.

    Runs under forked RNG with its own seeded generators, and casts nothing: training is unaffected.
    """
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    acc, c = state.accelerator, state.components
    unet = acc.unwrap_model(state.unet)
    text_encoder = acc.unwrap_model(state.text_encoder)
    scheduler = DPMSolverMultistepScheduler.from_config(c.inference_scheduler_config)
    if c.tokenizer_2 is not None:  # SDXL: the sampler passes pooled embeddings and size conditioning itself
        pipe = StableDiffusionXLPipeline(
            vae=c.vae, text_encoder=text_encoder.text_encoder, text_encoder_2=text_encoder.text_encoder_2,
            tokenizer=c.tokenizer, tokenizer_2=c.tokenizer_2, unet=unet, scheduler=scheduler,
            force_zeros_for_empty_prompt=c.force_zeros_for_empty_prompt, add_watermarker=False,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=c.vae, text_encoder=text_encoder, tokenizer=c.tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
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
    legend = [[label, prompt] for label, prompt in rows]  # top to bottom
    if config.palp.target_prompt:
        legend.append(["x0 base", f"x0-hat at t=T-1, base model (adapter off), {class_prompt!r}"])
        legend.append(["x0 now", f"x0-hat at t=T-1, current weights, {current_prompt!r}"])
    return record.preview(step, _grid(grid_rows), {"step": step, "seeds": seeds, "rows": legend})


def _x0_image(state: TrainState, pipe, prompt: str, adapter: bool, seed: int, res: int, scale: float):
    c = state.components
    device = state.accelerator.device
    t_last = c.noise_scheduler.config.num_train_timesteps - 1
    latent_res = res // pipe.vae_scale_factor
    latents = torch.randn((1, c.unet.config.in_channels, latent_res, latent_res),
                          generator=torch.Generator("cpu").manual_seed(seed)).to(device)
    ids = models.tokenize(c.tokenizer, [prompt], c.tokenizer_2)
    cond = models.encode_prompt(state.accelerator.unwrap_model(state.text_encoder), ids)
    abar = c.alphas_cumprod[t_last].to(device).view(1, 1, 1, 1)
    timesteps = torch.full((1,), t_last, device=device, dtype=torch.long)
    unet = state.accelerator.unwrap_model(state.unet)
    both = Conditioning.cat([state.null_cond, cond])
    time_ids = None if state.time_ids is None else size_conditioning(res).to(device)  # the preview's own size
    with adapters(state.lora_layers, adapter):
        out = models.unet_forward(unet, torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), both,
                                  time_ids).float()
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
# The command: plan -> lock -> setup -> loop -> finish


def train(project, *, steps: int | None = None, resume: bool = False, guidance: str | None = None,
          force: bool = False, console: Console | None = None) -> TrainResult:
    """Train the project's subjects. `project` is a Project or a project folder. See docs/training.md.

    Under a launcher of N processes (torchrun, accelerate launch) every process runs this; the main one plans,
    takes the lock, prints and writes, the others train their share of each batch and write nothing."""
    from palpcompose.project import load_project

    t0 = time.monotonic()
    if not hasattr(project, "config"):
        project = load_project(project)
    mixed_precision, precision_notice = _choose_mixed_precision(project.config.train.mixed_precision)
    accelerator = distributed.make_accelerator(mixed_precision, project.config.train.gradient_accumulation_steps)
    main = accelerator.is_main_process
    console = (console or Console()) if main else Console(quiet=True)  # one voice: the main process's
    # Writes nothing; on the main process only, whose plan every process follows
    plan = distributed.decided_by_main(accelerator, lambda: make_plan(project, steps=steps, resume=resume,
                                                                      guidance=guidance, force=force))
    if plan.up_to_date:
        console.print(f"weights are up to date ({plan.final_dir}); use --force to retrain")
        return TrainResult("up_to_date", plan.previous.get("steps_done", 0), plan.out, plan.final_dir)
    try:
        components = load_base_model(plan)  # the last checks: still nothing written
    except UserError as exc:
        exc.quiet = not main  # the same files, the same error on every process: said once
        raise
    if plan.notice:  # before anything is moved
        console.print(plan.notice, highlight=False, markup=False, soft_wrap=True)
    record = RunRecord(plan.out, new_manifest(plan, accelerator), writer=main)
    memory: dict = {}  # the estimate printed before training, for an out-of-memory message
    with _held_by_main(TrainingLock(plan.out / LOCK_FILE), accelerator), _stop_requests() as stop:
        try:
            state, subjects, generator = setup(plan, record, components, accelerator, console,
                                               [precision_notice], memory)
            losses = loop(plan, record, state, subjects, generator, stop, console, t0)
            return finish(plan, record, state, generator, losses, console, t0)
        except torch.OutOfMemoryError:
            record.mark(status="failed", finished_at=now())
            raise OutOfMemory(out_of_memory_message(
                plan.config, mixed_precision, record.manifest["device"], record.step, record.checkpoint_step,
                plan.out / "checkpoint", memory.get("estimate"))) from None
        except KeyboardInterrupt:  # a second Ctrl-C (the first one stops after the step): at once, no new checkpoint
            raise _stopped_at_once(plan, record) from None
        except BaseException as exc:
            if record.manifest["status"] == "running":
                record.mark(status="failed", finished_at=now())
            if distributed.lost_peer(accelerator, exc):
                raise _lost_peer(plan, record, exc) from exc
            raise


@contextlib.contextmanager
def _held_by_main(lock: TrainingLock, accelerator):
    """The training lock, taken and released by the main process; the others learn whether it was taken."""
    distributed.decided_by_main(accelerator, lock.acquire)
    try:
        yield
    finally:
        if accelerator.is_main_process:
            lock.release()


def load_base_model(plan: Plan) -> models.Components:
    """The base model's components; refuses prompts the text encoder would cut off (as `check` says)."""
    from palpcompose.project import config_prompts, too_long_problems

    config = plan.config
    try:
        components = models.load_components(plan.source)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"project.base_model: {config.project.base_model!r} could not be loaded "
                        f"({type(exc).__name__}: {exc}); point it at a diffusers folder, a .safetensors file, "
                        "a cached hub id or builtin:toy") from exc
    too_long = too_long_problems(plan.project.file, components.tokenizer, config_prompts(config))
    if too_long:
        raise ProjectError(too_long)
    return components


def new_manifest(plan: Plan, accelerator) -> dict:
    """This run's out/manifest.json as it starts (RunRecord.begin writes it)."""
    config = plan.config
    return {
        "palpcompose_version": __version__, "status": "running",
        "base_model": {"spec": plan.source.spec, "kind": plan.source.kind, "identity": plan.identity},
        "config": config.to_dict(), "config_hash": config.hash(), "training_hash": config.training_hash(),
        "palp_toml": plan.file_hashes, "images": plan.images,
        "tokens": models.placeholder_tokens(config.project.name, config.subjects), "git": git_state(plan.project.root),
        # the defaults the base model chose for keys palp.toml leaves out (project.resolve_model_defaults)
        "model_defaults": {key: value for key, (value, _) in getattr(plan.project, "model_defaults", {}).items()},
        "steps_done": 0, "steps_target": plan.steps_target, "guidance": plan.mode, "wall_time_s": 0.0,
        "device": _device_name(accelerator.device), "started_at": now(), "finished_at": None,
        "num_processes": accelerator.num_processes,
        "effective_batch_size": distributed.effective_batch(accelerator.num_processes, config.train.batch_size,
                                                            config.train.gradient_accumulation_steps),
    }


def setup(plan: Plan, record: RunRecord, components: models.Components, accelerator, console: Console,
          notices: list[str], memory: dict) -> tuple[TrainState, list[SubjectData], torch.Generator]:
    """Model, optimizer, cached latents and prompts, the data generator; the checkpoint restored on a resume. Ends
    by starting the run's record (the first write of a fresh run)."""
    config, tokens = plan.config, record.manifest["tokens"]
    notices = [*notices, models.set_attention(components.unet, config.train.attention, accelerator.device.type)]
    for notice in notices:
        if notice:
            console.print(notice)
    state = prepare_state(config, components, accelerator, GuidanceConfig.from_palp(config.palp, plan.mode), tokens)
    if accelerator.device.type == "cuda":
        memory["estimate"] = estimate = estimate_training_memory(
            components.unet, components.vae, components.text_encoder,
            state.lora_params + [state.token_embedding.rows], resolution=config.train.resolution,
            batch_size=config.train.batch_size, half_precision=state.weight_dtype != torch.float32,
            gradient_checkpointing=config.train.recomputes_activations,
            vae_on_device=not config.train.low_memory)
        total = torch.cuda.get_device_properties(accelerator.device).total_memory / 2**30
        console.print(f"{estimate.describe()}; this GPU has {total:.1f} GiB")
    subjects = prepare_subjects(plan.project, config, state, tokens)
    if config.train.low_memory:
        offload_vae(state)  # the latents are cached: the step never uses the VAE again
    # This process's own draws: subjects, images, flips, timesteps, noise (rank 0: train.seed itself)
    generator = torch.Generator("cpu").manual_seed(distributed.data_seed(config.train.seed, accelerator.process_index))
    console.print(distributed.describe_batch(accelerator.num_processes, config.train.batch_size,
                                             config.train.gradient_accumulation_steps))
    resumed_step = None
    if plan.resume_from is not None:  # read by the main process's plan: the same on every process
        ckpt = plan.checkpoint
        restore_checkpoint(state, ckpt, tokens, generator)
        resumed_step = ckpt.step
        console.print(f"resuming at step {resumed_step} of {plan.steps_target}")
    record.begin(resumed_step, plan.archive)
    return state, subjects, generator


def loop(plan: Plan, record: RunRecord, state: TrainState, subjects: list[SubjectData], generator, stop: dict,
         console: Console, t0: float) -> dict[str, float]:
    """sample -> step -> log -> preview -> snapshot + checkpoint, to plan.steps_target. Returns the last losses."""
    config, tokens, target = plan.config, record.manifest["tokens"], plan.steps_target

    def save_checkpoint(status: str) -> None:
        ckpt = make_checkpoint(state, config, tokens, record.step, generator, plan.settings)
        record.checkpoint(ckpt, status, time.monotonic() - t0)

    losses: dict[str, float] = {}
    with TrainingProgress(console, target, record.step) as progress:
        while record.step < target:
            for _ in range(config.train.gradient_accumulation_steps):
                batch = sample_batch(subjects, generator, config.train.batch_size,
                                     state.components.noise_scheduler.config.num_train_timesteps)
                try:
                    losses = training_step(state, batch)
                except NonFiniteError as exc:
                    record.mark(status="failed", steps_done=record.step, finished_at=now(),
                                wall_time_s=record.wall_time(time.monotonic() - t0))
                    kept = (f"the last good snapshot is {record.last_snapshot}" if record.last_snapshot
                            else "no snapshot yet")
                    raise NonFiniteError(f"stopped at step {record.step + 1}: {exc}. {kept}; the last checkpoint in "
                                         f"{plan.out / 'checkpoint'} is untouched") from None
            losses = distributed.mean(state.accelerator, losses)
            record.step += 1
            step = record.step
            record.log.append({"step": step, **{k: round(v, 6) for k, v in losses.items()},
                               "lr": state.optimizer.param_groups[0]["lr"], "time_s": round(time.monotonic() - t0, 3)})
            progress.update(step, losses)
            if record.writer and config.train.preview_every and step % config.train.preview_every == 0:
                render_preview(state, config, tokens, step, record)  # on the main process only
            if config.train.save_every and step % config.train.save_every == 0 and step < target:
                record.snapshot(step, trained_weights(state, config, tokens, step))
                save_checkpoint("running")
            # Every process stops after the same step: a signal to any one of them stops them all
            if distributed.any_process(state.accelerator, stop.get("signal") is not None) and step < target:
                save_checkpoint("interrupted")
                distributed.barrier(state.accelerator)  # the checkpoint is on disk before any process exits
                raise Interrupted(f"interrupted at step {step} of {target}; a checkpoint was written. Resume with: "
                                  f"{plan.resume_command}", quiet=not record.writer)
    return losses


def finish(plan: Plan, record: RunRecord, state: TrainState, generator, losses: dict[str, float],
           console: Console, t0: float) -> TrainResult:
    """Final weights (and the snapshot of the last step), checkpoint, log, plot, manifest, summary."""
    config, tokens, step = plan.config, record.manifest["tokens"], record.step
    final = trained_weights(state, config, tokens, step)
    final_dir = record.final(final)
    if config.train.save_every:
        record.snapshot(step, final)
    record.manifest["finished_at"] = now()
    ckpt = make_checkpoint(state, config, tokens, step, generator, plan.settings)
    record.checkpoint(ckpt, "completed", time.monotonic() - t0)
    record.plot(plot_losses)
    distributed.barrier(state.accelerator)  # done when the main process has written everything
    result = TrainResult("completed", step, plan.out, final_dir, record.manifest["wall_time_s"], dict(losses))
    _summary(console, result, record.log, plan.mode)
    return result


def _stopped_at_once(plan: Plan, record: RunRecord) -> Interrupted:
    """The message of a second Ctrl-C: what was kept, and the command to continue."""
    target = plan.steps_target
    if not record.ours:  # still setting up: nothing of the previous run was touched
        again = plan.resume_command if plan.resume_from else plan.fresh_command
        return Interrupted(f"interrupted before training started; nothing was changed. Run again with: {again}")
    record.mark(status="interrupted", steps_done=record.checkpoint_step or 0, finished_at=now())
    if record.checkpoint_step is None:
        return Interrupted(f"stopped at once at step {record.step} of {target} (second interrupt), before the "
                           f"first checkpoint; run `{command_line('palpcompose', 'train', plan.project.root)}` again")
    return Interrupted(f"stopped at once at step {record.step} of {target} (second interrupt); the last checkpoint "
                       f"is at step {record.checkpoint_step}. Resume with: {plan.resume_command}")


def _lost_peer(plan: Plan, record: RunRecord, exc: BaseException) -> distributed.ProcessLost:
    """The message when another process of the run is gone: every process stops, the checkpoint is kept."""
    detail = " ".join(str(exc).split())[:160]  # gloo's message spans lines
    kept = (f"the last checkpoint is at step {record.checkpoint_step}. Resume with: {plan.resume_command}"
            if record.checkpoint_step is not None else f"there was no checkpoint yet; run again with: "
            f"{plan.fresh_command}")
    return distributed.ProcessLost(
        f"stopped at step {record.step} of {plan.steps_target}: another process of this run is gone (the "
        f"launcher's log says which, and why); {kept}. ({type(exc).__name__}: {detail})")


@contextlib.contextmanager
def _stop_requests():
    """SIGINT/SIGTERM ask the loop to stop after the current step (the dict gets "signal"); a second Ctrl-C
    stops at once (KeyboardInterrupt). The earlier handlers come back on exit."""
    stop: dict = {}
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.get("signal") is not None:
            raise KeyboardInterrupt
        stop["signal"] = signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _choose_mixed_precision(requested: str) -> tuple[str, str]:
    """bf16/fp16 on accelerators; fp32 on the CPU (CPU autocast is slow, and fp32 keeps runs bit-reproducible)."""
    if requested != "no" and not (torch.cuda.is_available() or torch.backends.mps.is_available()):
        return "no", f"mixed_precision: {requested} -> no (CPU: training runs in fp32)"
    return requested, ""


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


class TrainingProgress:
    """The loop's progress. On a terminal, a rich bar that fits 80 columns: steps, bar, losses, elapsed, ETA (and the
    rate from 100 columns on). Otherwise (logs, CI, nohup) a plain line every max(10 steps, 5%) and at the last
    step, with the same facts."""

    def __init__(self, console: Console, total: int, completed: int):
        self.console, self.total, self.first = console, total, completed
        self.every = max(10, math.ceil(total * 0.05))
        self.t0 = time.monotonic()
        self.bar = None
        if console.is_terminal:
            columns = [TextColumn("step {task.completed}/{task.total}"), BarColumn(bar_width=None),
                       TextColumn("{task.fields[losses]}"), TimeElapsedColumn(), TextColumn("ETA"),
                       TimeRemainingColumn()]
            if console.width >= 100:
                columns.insert(3, TextColumn("{task.fields[rate]}"))
            self.bar = Progress(*columns, console=console, expand=True)
            self.task = self.bar.add_task("training", total=total, completed=completed, losses="", rate="")

    def __enter__(self):
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, step: int, losses: dict[str, float]) -> None:
        shown = " ".join(f"{k.removeprefix('loss_')} {v:.4f}" for k, v in losses.items() if k.startswith("loss_"))
        elapsed = time.monotonic() - self.t0
        rate = (step - self.first) / elapsed if elapsed > 0 else 0.0
        if self.bar is not None:
            self.bar.update(self.task, completed=step, losses=shown, rate=f"{rate:.2f} steps/s")
        elif step % self.every == 0 or step == self.total:
            eta = _clock((self.total - step) / rate) if rate > 0 else "?"
            self.console.print(f"step {step}/{self.total} ({100 * step // self.total}%)  {shown}  elapsed "
                               f"{_clock(elapsed)}  ETA {eta}", highlight=False, markup=False, soft_wrap=True)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


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
