"""What training shows while it runs: the preview grid (out/previews/) and, at the end, the loss plot
(out/logs/loss.png). Both are written through run.RunRecord (previews) or atomically (the plot)."""

from __future__ import annotations

from pathlib import Path

import torch

from palpcompose import models
from palpcompose.conditioning import Conditioning, size_conditioning
from palpcompose.data import SubjectData
from palpcompose.fsutil import atomic_save_image
from palpcompose.guidance import cfg, predict_x0, v_to_eps
from palpcompose.step import TrainState, adapters, vae_on_device

PREVIEW_SEEDS = 2  # columns of a preview grid: the first seeds of [render].seeds
PREVIEW_MAX_STEPS = 25  # sampling steps of a preview (at most; [render].steps when lower)
PREVIEW_TILE = 128  # tiles smaller than this are upscaled (nearest) so tiny models stay visible


def preview_prompts(config, tokens: dict[str, str]) -> list[tuple[str, str]]:
    """(label, prompt) rows of a preview grid: target prompt, each subject alone, all subjects together."""
    rows = []
    if config.palp.target_prompt:
        rows.append(("target", models.expand_placeholders(config.palp.target_prompt, tokens)))
    for key, subject in config.subjects.items():
        rows.append((key, models.expand_placeholders(subject.prompt, tokens)))
    if len(tokens) > 1:
        rows.append(("together", "a photo of " + " and ".join(tokens[k] for k in config.subjects)))
    return rows


def preview_shapes(subjects: list[SubjectData]) -> dict[str, tuple[int, int]]:
    """The latent (height, width) each preview row is drawn at, with aspect-ratio buckets: a subject's row at its
    references' most common bucket, the other rows ("" key) at the most common one of all references. Square
    references: train.resolution everywhere."""
    def most_common(shapes: list[tuple[int, ...]]) -> tuple[int, int]:
        return max(sorted(set(shapes)), key=shapes.count)

    per_subject = {s.key: [s.shape(i) for i in range(s.num_images)] for s in subjects}
    shapes = {key: most_common(found) for key, found in per_subject.items()}
    shapes[""] = most_common([shape for found in per_subject.values() for shape in found])
    return shapes


@torch.no_grad()
def render_preview(state: TrainState, config, tokens: dict[str, str], step: int, record,
                   shapes: dict[str, tuple[int, int]] | None = None) -> Path:
    """One grid PNG (rows: prompts, then the x0-hat diagnostic; columns: fixed seeds) plus a JSON legend, written
    by `record` (run.RunRecord) into out/previews/. `shapes` (preview_shapes): the latent size of each row, the
    references' own (aspect-ratio buckets); default train.resolution square.

    Runs under forked RNG with its own seeded generators, and casts nothing: training is unaffected.
    """
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    acc, c = state.accelerator, state.components
    if c.flow:
        return _flow_preview(state, config, tokens, step, record)
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
    factor = pipe.vae_scale_factor

    def size(label: str) -> tuple[int, int]:  # (height, width) in pixels of a row
        shape = (shapes or {}).get(label, (shapes or {}).get(""))
        return (res, res) if shape is None else (shape[0] * factor, shape[1] * factor)

    rows = preview_prompts(config, tokens)
    grid_rows: list[tuple[str, list]] = []
    cuda_devices = [acc.device] if acc.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices), acc.autocast(), vae_on_device(state):
        for label, prompt in rows:
            height, width = size(label)
            images = [
                pipe(prompt, height=height, width=width,
                     num_inference_steps=min(config.render.steps, PREVIEW_MAX_STEPS),
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
                grid_rows.append((label, [_x0_image(state, pipe, prompt, adapter, seed, size(""),
                                                    config.render.guidance_scale) for seed in seeds]))
    legend = [[label, prompt] for label, prompt in rows]  # top to bottom
    if config.palp.target_prompt:
        legend.append(["x0 base", f"x0-hat at t=T-1, base model (adapter off), {class_prompt!r}"])
        legend.append(["x0 now", f"x0-hat at t=T-1, current weights, {current_prompt!r}"])
    return record.preview(step, _grid(grid_rows), {"step": step, "seeds": seeds, "rows": legend})


def _flow_preview(state: TrainState, config, tokens: dict[str, str], step: int, record) -> Path:
    """The preview grid of a flow family (Flux.1, SD 3): its own pipeline over the training components, its own
    sampler (flow-matching Euler), its guidance (the embedding's value for a distilled model, else real CFG); T5
    reads class words when it holds no token (`train.t5_tokens = false`). Rows: the prompts, and the x0-hat
    diagnostic at s = 1 (x0_hat = eps - v_hat, docs/method.md) of the base model and the current weights."""
    import diffusers

    acc, c = state.accelerator, state.components
    family = models.family_of(c.family)
    encoders = acc.unwrap_model(state.text_encoder)
    parts = {slot.component: e for slot, e in zip(encoders.slots, encoders.in_use)}  # an idle T5: its cache
    parts.update({slot.tokenizer: t for slot, t in zip(encoders.slots, encoders.tokenizers)})
    transformer = acc.unwrap_model(state.unet)
    pipe = getattr(diffusers, family.pipeline_class)(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_config(c.inference_scheduler_config),
        vae=c.vae, transformer=transformer, **parts)
    pipe.set_progress_bar_config(disable=True)
    distilled = family.flow.distilled(dict(transformer.config))
    guidance = family.flow.render_kwargs(config.render.guidance_scale, distilled, config.render.negative_prompt)
    seeds = list(config.render.seeds[:PREVIEW_SEEDS]) or [0]
    res = config.train.resolution
    rows = preview_prompts(config, tokens)
    class_words = {k: s.class_name for k, s in config.subjects.items()}
    grid_rows: list[tuple[str, list]] = []
    cuda_devices = [acc.device] if acc.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices), acc.autocast(), vae_on_device(state):
        for label, prompt in rows:
            t5 = {} if all(encoders.with_tokens) else {  # T5 holds no token: it reads the class words
                family.flow.t5_prompt: _substituted(prompt, encoders.substitutions)}
            grid_rows.append((label, [
                pipe(prompt, height=res, width=res, num_inference_steps=min(config.render.steps, PREVIEW_MAX_STEPS),
                     generator=torch.Generator("cpu").manual_seed(seed), **guidance, **t5).images[0]
                for seed in seeds]))
        if config.palp.target_prompt:
            class_prompt = models.expand_placeholders(config.palp.target_prompt, class_words)
            current_prompt = models.expand_placeholders(config.palp.target_prompt, tokens)
            for label, prompt, adapter in (("x0 base", class_prompt, False), ("x0 now", current_prompt, True)):
                grid_rows.append((label, [_flow_x0_image(state, pipe, family, prompt, adapter, seed, res, distilled)
                                          for seed in seeds]))
    legend = [[label, prompt] for label, prompt in rows]
    if config.palp.target_prompt:
        legend.append(["x0 base", f"x0-hat at s=1, base model (adapter off), {class_prompt!r}"])
        legend.append(["x0 now", f"x0-hat at s=1, current weights, {current_prompt!r}"])
    return record.preview(step, _grid(grid_rows), {"step": step, "seeds": seeds, "rows": legend})


def _substituted(prompt: str, words: dict[str, str]) -> str:
    for token, word in words.items():
        prompt = prompt.replace(token, word)
    return prompt


def _flow_x0_image(state: TrainState, pipe, family, prompt: str, adapter: bool, seed: int, res: int,
                   distilled: bool):
    """x0_hat = eps - v_hat at s = 1 (one pass at the personalization guidance: beta for a distilled model)."""
    c, device = state.components, state.accelerator.device
    latent_res = res // pipe.vae_scale_factor
    eps = torch.randn((1, c.vae.config.latent_channels, latent_res, latent_res),
                      generator=torch.Generator("cpu").manual_seed(seed)).to(device)
    cond = state.accelerator.unwrap_model(state.text_encoder)(c.tokenize([prompt]))
    with adapters(state.lora_layers, adapter):
        v_hat = family.flow.forward(state.accelerator.unwrap_model(state.unet), eps.to(c.vae.dtype),
                                    torch.ones(1, device=device), cond,
                                    state.guidance.config.beta if distilled else None).float()
    x0_hat = eps - v_hat
    shift = getattr(c.vae.config, "shift_factor", None) or 0.0
    image = c.vae.decode((x0_hat / c.vae.config.scaling_factor + shift).to(c.vae.dtype)).sample.float()
    return pipe.image_processor.postprocess(image, output_type="pil")[0]


def _x0_image(state: TrainState, pipe, prompt: str, adapter: bool, seed: int, size: tuple[int, int], scale: float):
    """x0-hat at t = T - 1 from the seed's noise, at `size` (height, width) in pixels."""
    c = state.components
    device = state.accelerator.device
    t_last = c.noise_scheduler.config.num_train_timesteps - 1
    height, width = size
    latents = torch.randn((1, c.unet.config.in_channels, height // pipe.vae_scale_factor,
                           width // pipe.vae_scale_factor),
                          generator=torch.Generator("cpu").manual_seed(seed)).to(device)
    ids = models.tokenize(c.tokenizer, [prompt], c.tokenizer_2)
    cond = models.encode_prompt(state.accelerator.unwrap_model(state.text_encoder), ids)
    abar = c.alphas_cumprod[t_last].to(device).view(1, 1, 1, 1)
    timesteps = torch.full((1,), t_last, device=device, dtype=torch.long)
    unet = state.accelerator.unwrap_model(state.unet)
    both = Conditioning.cat([state.null_cond, cond])
    time_ids = None if state.time_ids is None else size_conditioning(height, width).to(device)  # the preview's size
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

    tile = max(PREVIEW_TILE, *rows[0][1][0].size)
    label_w = 90
    cols = max(len(images) for _, images in rows)
    grid = Image.new("RGB", (label_w + cols * tile, len(rows) * tile), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        draw.text((4, r * tile + tile // 2 - 6), label, fill="black")
        for col, image in enumerate(images):
            scale = tile / max(image.size)  # a non-square image (a bucket's) fits the tile, centred, undistorted
            fitted = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.NEAREST)
            grid.paste(fitted, (label_w + col * tile + (tile - fitted.width) // 2,
                                r * tile + (tile - fitted.height) // 2))
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
        xy = [(pad + (s - first) / max(last - first, 1) * (width - 2 * pad),
               top + panel - pad - (v - lo) / span * (panel - 2 * pad))
              for s, v in points]
        draw.rectangle((pad, top + pad, width - pad, top + panel - pad), outline="grey")
        if len(xy) > 1:
            draw.line(xy, fill="navy", width=2)
        draw.text((pad, top + 10), f"{key}  (min {lo:.4g}, max {hi:.4g}, last step {last})", fill="black")
    atomic_save_image(path, image)
