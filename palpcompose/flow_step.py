"""One PALP training step for the rectified-flow families (Flux.1, SD 3), and the state it runs on: step.py's
TrainState and loop, with the family's own denoiser call, noise levels and prompt encoding, and the flow guidance
terms of flow_guidance.py (docs/method.md "PALP for rectified flow", flow steps 1 to 7).

What differs from SD is read from the family (models.flux, models.sd3: `Family.flow`): how the transformer is
called and what its `timestep` is, how prompts are encoded, whether the model is guidance-distilled (then alpha and
beta are the values fed to its guidance embedding, one pass each, and the personalization branch runs at beta).
`prepare_flow_state` returns a TrainState whose `step_fn` is `flow_training_step`, so step.training_step (and
train.py's loop, checkpoints, resume) run it unchanged.
"""

from __future__ import annotations

import torch

from palpcompose import models
from palpcompose.conditioning import Conditioning
from palpcompose.data import Batch
from palpcompose.flow_guidance import (
    VELOCITY,
    add_noise,
    expand_sigma,
    flow_loss,
    guided_velocity,
    predict_x0,
)
from palpcompose.guidance import GuidanceConfig, PalpGuidance
from palpcompose.models.flow import recompute_t5_blocks, training_sigmas
from palpcompose.step import TrainState, adapters, place_and_optimize, update
from palpcompose.tokens import add_trained_tokens


def prepare_flow_state(config, components: models.Components, accelerator, guidance_config: GuidanceConfig,
                       tokens: dict[str, str]) -> TrainState:
    """step.prepare_state for a flow family: freeze, one learned token per subject in every encoder that reads the
    prompt (T5 only with `train.t5_tokens`, else T5 reads the class word), LoRA on the transformer, gradient
    checkpointing with `train.recomputes_activations` (the transformer's, and the blocks of a T5 that trains a token),
    the optimizer, and the fixed prompts encoded once (the empty prompt only for real CFG: a distilled model never
    reads it)."""
    c, train_cfg = components, config.train
    models.freeze(c.unet, c.vae, c.text_encoder)
    encoders = c.text_encoder
    if not train_cfg.t5_tokens:  # T5 reads the class word: no backward pass through it
        encoders.with_tokens = [slot.kind != "t5" for slot in encoders.slots]
        encoders.substitutions = {tokens[k]: s.class_name for k, s in config.subjects.items()}
    init_words = {key: s.init_word for key, s in config.subjects.items()}
    token_ids, token_embedding = add_trained_tokens(c, tokens, init_words)
    torch.manual_seed(train_cfg.seed)  # LoRA initialisation
    lora_params = models.add_lora(c.unet, train_cfg.lora_rank, train_cfg.lora_alpha, c.lora_targets,
                                  adapter=train_cfg.adapter)
    if train_cfg.recomputes_activations:
        c.unet.enable_gradient_checkpointing()
        for encoder, slot, holds in zip(encoders.encoders, encoders.slots, encoders.with_tokens, strict=True):
            if slot.kind == "t5" and holds:  # y_P's pass through T5-XXL keeps 2.2 GiB otherwise (8 bits, 512 tokens)
                recompute_t5_blocks(encoder)
    idle = [e for e, holds in zip(encoders.encoders, encoders.with_tokens, strict=True) if not holds]  # T5, no tokens
    weight_dtype, unet, text_encoder, optimizer, lr_scheduler = place_and_optimize(
        c, accelerator, train_cfg, lora_params, token_embedding, idle_encoders=idle)
    with torch.no_grad():
        null_cond = None if distilled(c) else c.text_encoder(c.tokenize([""])).detach()
        clean_cond = None
        if guidance_config.mode != "none":
            clean_cond = c.text_encoder(c.tokenize([config.palp.clean_prompt])).detach()
    return TrainState(
        accelerator=accelerator, components=c, unet=unet, text_encoder=text_encoder,
        guidance=PalpGuidance(guidance_config, VELOCITY), optimizer=optimizer, lr_scheduler=lr_scheduler,
        lora_params=lora_params, token_embedding=token_embedding, token_ids=token_ids, null_cond=null_cond,
        clean_cond=clean_cond, weight_dtype=weight_dtype, max_grad_norm=train_cfg.max_grad_norm,
        lora_layers=models.lora_layers(c.unet), step_fn=flow_training_step,
    )


def distilled(c: models.Components) -> bool:
    """Whether the base model is guidance-distilled (Flux.1-dev: `guidance_embeds` in its transformer config)."""
    return models.family_of(c.family).flow.distilled(dict(c.unet.config))


def make_flow_denoiser(state: TrainState, sigmas: torch.Tensor, personal: Conditioning):
    """The `denoise` callable of guidance.PalpGuidance: fp32 velocity with guidance applied (the guidance
    embedding set to the scale for a distilled model, one pass; classifier-free guidance otherwise)."""
    flow = models.family_of(state.components.family).flow
    prompts = {"personal": personal, "clean": state.clean_cond, "empty": state.null_cond}
    is_distilled = distilled(state.components)

    def denoise(latents, *, adapter: bool, prompt: str, scale: float) -> torch.Tensor:
        def predict(x, *, prompt: str, guidance) -> torch.Tensor:
            cond = prompts[prompt]
            if cond.embeds.shape[0] != x.shape[0]:
                cond = cond.expand(x.shape[0])
            with adapters(state.lora_layers, adapter), state.accelerator.autocast():
                return flow.forward(state.unet, x, sigmas, cond, guidance).float()

        return guided_velocity(predict, latents, prompt=prompt, scale=scale, distilled=is_distilled)

    return denoise


def flow_training_step(state: TrainState, batch: Batch) -> dict[str, float]:
    """One micro-step (docs/method.md flow steps 1-7): forward, loss, backward, and the optimizer step when
    gradients sync. The noise level of each sample comes from its batch draw (models.flow.training_sigmas)."""
    acc, c = state.accelerator, state.components
    flow = models.family_of(c.family).flow
    device = acc.device
    config = state.guidance.config
    latents, noise = batch.latents.to(device), batch.noise.to(device)
    sigmas = training_sigmas(batch.timesteps, c.noise_scheduler.config.num_train_timesteps,
                             c.inference_scheduler_config, tuple(latents.shape[-2:])).to(device)  # flow step 1
    sigma = expand_sigma(sigmas, latents.ndim)
    guidance = config.beta if distilled(c) else None  # a distilled model's branch runs at beta (method.md)
    with acc.accumulate(state.unet, state.text_encoder):
        with acc.autocast():
            personal = state.text_encoder(batch.input_ids.to(device))  # y_P: gradients reach the token rows
            noisy_latents = add_noise(latents, noise, sigma)
            v_hat = flow.forward(state.unet, noisy_latents, sigmas, personal, guidance).float()
        terms = {"loss_pers": flow_loss(v_hat, latents, noise)}  # flow step 2
        loss = terms["loss_pers"]
        if config.mode != "none":
            x0_hat = predict_x0(noisy_latents, v_hat, sigma)  # flow step 3, graph kept; 4-6 in PalpGuidance
            denoise = make_flow_denoiser(state, sigmas, personal.detach())
            terms.update(state.guidance(x0_hat=x0_hat, noise=noise, level=sigma, denoise=denoise,
                                        fresh_noise=batch.fresh_noise.to(device)))
            loss = loss + config.weight * terms["loss_align"]  # flow step 7
        return update(state, loss, terms, v_hat)
