"""One PALP training step (docs/method.md, "One training step"; paper Fig. 4) and the state it runs on.

`prepare_state` freezes the base model, adds the subjects' tokens and the LoRA, builds the optimizer and encodes the
fixed prompts once; `training_step(state, batch)` is one micro-step with every UNet pass in it: the personalization
loss (step 2), x0-hat (Eq. 2), the guidance terms (steps 4-6, guidance.PalpGuidance) and the update (step 7).
Callable on its own (benchmarks, tests); `train.train` runs it in its loop.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from palpcompose import distributed, models
from palpcompose.conditioning import Conditioning, size_conditioning
from palpcompose.data import Batch
from palpcompose.guidance import (
    EPSILON,
    GuidanceConfig,
    PalpGuidance,
    add_noise,
    cfg,
    check_finite,
    predict_x0,
    v_to_eps,
)
from palpcompose.quantize import quantize_frozen, quantize_frozen_text_encoder
from palpcompose.tokens import PlaceholderEmbedding, add_trained_tokens

LORA_WEIGHT_DECAY = 1e-2  # AdamW default of diffusers' LoRA scripts
EMBEDDING_WEIGHT_DECAY = 0.0  # decay would shrink the new tokens' norm away from CLIP's embedding scale


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
    time_ids: torch.Tensor | None = None  # SDXL's size conditioning (1, 6) at train.resolution; None for SD 1/2
    step_fn: object = None  # a flow family's step (flow_step.flow_training_step); None: the diffusion step below

    @property
    def null_embeds(self) -> torch.Tensor:
        return self.null_cond.embeds

    @property
    def clean_embeds(self) -> torch.Tensor | None:
        return None if self.clean_cond is None else self.clean_cond.embeds


def prepare_state(config, components: models.Components, accelerator, guidance_config: GuidanceConfig,
                  tokens: dict[str, str]) -> TrainState:
    """Freeze the model, add the subjects' tokens and the LoRA, set dtypes, build the optimizer, cache prompts.
    `config` is the project's resolved configuration (project.load_project fills in every documented default:
    init_word, lora_alpha, the personalization prompts); `guidance_config` is guidance.guidance_config(config)."""
    c, train_cfg = components, config.train
    device = accelerator.device
    # Freeze everything; LoRA weights and the placeholder rows are the only trainable values
    models.freeze(c.unet, c.vae, c.text_encoder)
    init_words = {key: s.init_word for key, s in config.subjects.items()}  # resolved by the project
    token_ids, token_embedding = add_trained_tokens(c, tokens, init_words)
    torch.manual_seed(train_cfg.seed)  # LoRA initialisation
    lora_params = models.add_lora(c.unet, train_cfg.lora_rank, train_cfg.lora_alpha, adapter=train_cfg.adapter)
    if train_cfg.recomputes_activations:
        c.unet.enable_gradient_checkpointing()
    # (SDXL's VAE overflows in fp16, its config says force_upcast: under fp16 it stays fp32, as its pipeline does)
    vae_fp32 = c.tokenizer_2 is not None and accelerator.mixed_precision == "fp16" \
        and c.vae.config.get("force_upcast", True)
    weight_dtype, unet, text_encoder, optimizer, lr_scheduler = place_and_optimize(
        c, accelerator, train_cfg, lora_params, token_embedding, vae_fp32=vae_fp32)
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
        guidance=PalpGuidance(guidance_config, EPSILON), optimizer=optimizer, lr_scheduler=lr_scheduler,
        lora_params=lora_params, token_embedding=token_embedding, token_ids=token_ids, null_cond=null_cond,
        clean_cond=clean_cond, weight_dtype=weight_dtype, max_grad_norm=train_cfg.max_grad_norm,
        lora_layers=models.lora_layers(c.unet), time_ids=time_ids,
    )


def place_and_optimize(c: models.Components, accelerator, train_cfg, lora_params: list, token_embedding, *,
                       vae_fp32: bool = False, idle_encoders=()):
    """Frozen weights on the device in the mixed-precision dtype (the VAE kept fp32 when `vae_fp32`), trainable ones
    (LoRA, the placeholder rows) in fp32; AdamW over the LoRA and the rows; everything through accelerator.prepare.
    Shared by every family's setup (prepare_state here, flow_step's for Flux.1 / SD 3).
    `idle_encoders`: text encoders that hold no trained token (a flow family's T5 with `train.t5_tokens = false`);
    they go to the mixed-precision dtype too, as diffusers' Flux LoRA script does with its frozen T5. Every module is
    cast in host memory before it moves, so the device never holds an fp32 copy of a frozen model (Flux.1-dev's
    transformer: 44 GiB in fp32, 22 in bf16).
    Returns (weight_dtype, denoiser, text_encoder, optimizer, lr_scheduler)."""
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    # 8-bit frozen linears, on the CPU, if asked: the denoiser's, and T5's when it trains a token (quantize.py)
    quantize_frozen(c.unet, train_cfg.frozen_weights, weight_dtype)
    quantize_frozen_text_encoder(c.text_encoder, train_cfg.frozen_weights)
    for module in (c.unet, c.vae, *idle_encoders):
        if weight_dtype != torch.float32 and not (module is c.vae and vae_fp32):
            module.to(dtype=weight_dtype)
    for module in (c.unet, c.vae, c.text_encoder):  # the idle encoders are parts of the text encoder
        module.to(device)
    for p in lora_params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW([
        {"params": lora_params, "lr": train_cfg.learning_rate, "weight_decay": LORA_WEIGHT_DECAY},
        {"params": [token_embedding.rows], "lr": train_cfg.embedding_learning_rate,
         "weight_decay": EMBEDDING_WEIGHT_DECAY},
    ])
    lr_scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(c.unet, c.text_encoder, optimizer, lr_scheduler)
    # Several processes: the LoRA weights (denoiser) and the placeholder rows (text encoder) average their gradients
    distributed.check_all_reduced(accelerator, [unet, text_encoder], lora_params + [token_embedding.rows])
    return weight_dtype, unet, text_encoder, optimizer, lr_scheduler


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


def make_denoiser(state: TrainState, timesteps: torch.Tensor, abar_t: torch.Tensor, personal: Conditioning,
                  time_ids: torch.Tensor | None = None):
    """The `denoise` callable of guidance.PalpGuidance for this step: fp32 eps with CFG, adapter on or off.
    `time_ids`: SDXL's size values of the batch (B, 6) (a bucket's); default the state's, train.resolution's."""
    unet = state.unet  # accelerate's prepared model: the UNet itself (its forward runs under autocast)
    prediction_type = state.components.prediction_type
    time_ids = state.time_ids if time_ids is None else time_ids

    def denoise(latents, *, adapter: bool, prompt: str, scale: float) -> torch.Tensor:
        batch = latents.shape[0]
        cond = state.clean_cond.expand(batch) if prompt == "clean" else personal
        if scale == 1.0:  # G^1 = G(x, t, y): no unconditional pass
            x, t, both, abar, sizes = latents, timesteps, cond, abar_t, time_ids
        else:  # one batched pass for G(x, t, null) and G(x, t, y): (2B, C, H, W)
            x, t, abar = torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), torch.cat([abar_t, abar_t])
            both = Conditioning.cat([state.null_cond.expand(batch), cond])
            sizes = time_ids if time_ids is None or time_ids.shape[0] == 1 else torch.cat([time_ids, time_ids])

        with adapters(state.lora_layers, adapter), state.accelerator.autocast():
            out = models.unet_forward(unet, x, t, both, sizes)
        out = out.float()
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


def encode_personal(state: TrainState, batch: Batch) -> Conditioning:
    """y_P of every sample, encoded with the learned tokens (gradients reach them). With per-image captions a batch
    may hold several prompts: each distinct one is encoded once and shared by its samples."""
    ids = batch.input_ids.to(state.accelerator.device)
    if not batch.captions:
        return models.encode_prompt(state.text_encoder, ids)  # SDXL: + pooled
    distinct, which = torch.unique(ids, dim=0, return_inverse=True)
    cond = models.encode_prompt(state.text_encoder, distinct)
    return Conditioning(cond.embeds[which], None if cond.pooled is None else cond.pooled[which])


def training_step(state: TrainState, batch: Batch) -> dict[str, float]:
    """One micro-step (method.md steps 2-7): forward, loss, backward, and the optimizer step when gradients sync.
    A flow family's state runs its own step (flow_step.py, set by its prepare_flow_state)."""
    if state.step_fn is not None:
        return state.step_fn(state, batch)
    acc, c = state.accelerator, state.components
    device = acc.device
    latents, noise = batch.latents.to(device), batch.noise.to(device)
    timesteps = batch.timesteps.to(device)
    abar_t = c.alphas_cumprod.to(device)[timesteps].view(-1, 1, 1, 1)  # (B, 1, 1, 1), the model's own schedule
    # SDXL's size values: a bucketed batch's own (original size, crop, bucket), else train.resolution's
    time_ids = state.time_ids
    if batch.size_ids is not None and time_ids is not None:
        time_ids = batch.size_ids.to(device)
    with acc.accumulate(state.unet, state.text_encoder):
        with acc.autocast():
            # y_P with the learned token: gradients reach the placeholder rows
            personal = encode_personal(state, batch)
            noisy_latents = add_noise(latents, noise, abar_t)  # forward diffusion x_t
            model_pred = models.unet_forward(state.unet, noisy_latents, timesteps, personal, time_ids).float()
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
            denoise = make_denoiser(state, timesteps, abar_t, personal.detach(), time_ids)
            terms.update(state.guidance(x0_hat=x0_hat, noise=noise, level=abar_t, denoise=denoise,
                                        fresh_noise=batch.fresh_noise.to(device)))
            loss = loss + state.guidance.config.weight * terms["loss_align"]  # step 7
        return update(state, loss, terms, model_pred)


def update(state: TrainState, loss: torch.Tensor, terms: dict[str, torch.Tensor],
           prediction: torch.Tensor) -> dict[str, float]:
    """Step 7's update, shared by every family's step (called inside its `accelerator.accumulate`): the gradient
    norms logged, backward, clipping when gradients sync, AdamW and the LR schedule; returns the logged values."""
    acc = state.accelerator
    terms.update(gradient_norms(terms, state.guidance.config.weight, prediction))
    check_finite("the training loss", loss)
    acc.backward(loss)
    if acc.sync_gradients and state.max_grad_norm > 0:
        acc.clip_grad_norm_(state.lora_params + [state.token_embedding.rows], state.max_grad_norm)
    state.optimizer.step()
    state.lr_scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    # One device-to-host copy for all the logged values (each float(tensor) would wait for the GPU on its own)
    return dict(zip(terms, torch.stack([v.detach().float() for v in terms.values()]).tolist(), strict=True))
