"""Our training step: palpcompose.train.training_step, set up on random-weight models instead of a project folder.

The engine's own setup runs unchanged (train.prepare_state: freeze, placeholder token, LoRA, dtypes, optimizer,
frozen prompts encoded once); the only difference from `palpcompose train` is where the reference latents come
from: random pixels encoded once by the VAE here, image files there (data.encode_references, the same math).
The accel levers are applied around it: module-level ones on the UNet, a fused AdamW rebuilt before the first step,
the SDPA backend as a context around the step, and CUDA graphs by wrapping the state's UNet
(accel.GraphedTrainingUNet).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from benchmarks import accel
from benchmarks.archs import Models
from palpcompose import models, train
from palpcompose.conditioning import SDXLTextEncoders
from palpcompose.data import SubjectData, sample_batch
from palpcompose.guidance import guidance_config
from palpcompose.project import (
    PalpConfig,
    ProjectConfig,
    ProjectSection,
    RenderConfig,
    SubjectConfig,
    TrainConfig,
)

PROJECT = "bench"
PERSONAL_PROMPT = "A photo of [V1]"
CLEAN_PROMPT = "An oil painting of a cat sitting on a rock"


def bench_config(mode: str, alpha: float, beta: float, batch: int, resolution: int, mixed_precision: str,
                 low_memory: bool = False, num_subjects: int = 1, adapter: str = "lora") -> ProjectConfig:
    """A project of `num_subjects` subjects (V1, V2, ...) with the paper's defaults (method.md), resolved as
    project.load_project resolves a palp.toml (init_word and lora_alpha filled in)."""
    return ProjectConfig(
        project=ProjectSection(name=PROJECT, base_model="builtin:toy"),
        subjects={f"V{k}": SubjectConfig(class_name="cat", images=("refs/cat.png",), init_word="cat",
                                         prompt=PERSONAL_PROMPT.replace("[V1]", f"[V{k}]"))
                  for k in range(1, num_subjects + 1)},
        palp=PalpConfig(target_prompt="An oil painting of [V1]", clean_prompt=CLEAN_PROMPT, guidance=mode,
                        alpha=alpha, beta=beta),
        train=TrainConfig(batch_size=batch, resolution=resolution, mixed_precision=mixed_precision,
                          low_memory=low_memory, lora_alpha=float(TrainConfig.lora_rank), adapter=adapter),
        render=RenderConfig(),
    )


def make_engine_step(
    m: Models, tokenizer, mode: str, opts: accel.AccelOptions, pixel_values: torch.Tensor, *, alpha: float = 7.5,
    beta: float = 1.0, mixed_precision: str = "no", seed: int = 0, low_memory: bool = False, num_subjects: int = 1,
    tokenizer_2=None, adapter: str = "lora",
) -> tuple[train.TrainState, Callable[[], dict[str, float]]]:
    """Build the engine's TrainState on `m` (which it takes over) and a no-argument callable running one step.
    `low_memory`: the engine's low-memory preset (train.low_memory): gradient checkpointing, and the VAE moved to the
    CPU once the latents are cached. `num_subjects`: that many subjects, each with its own placeholder row and the
    same reference latents; each sample of a batch draws one (data.sample_batch). SDXL (`m.text_encoder_2`): pass
    its second tokenizer as `tokenizer_2` (a separate object: each tokenizer gets the placeholder tokens). `adapter`:
    train.adapter, "lora" or "dora"."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    batch, _, resolution, _ = pixel_values.shape
    config = bench_config(mode, alpha, beta, batch, resolution, mixed_precision, low_memory=low_memory,
                          num_subjects=num_subjects, adapter=adapter)
    sdxl = m.text_encoder_2 is not None
    components = models.Components(
        unet=m.unet, vae=m.vae, tokenizer=tokenizer, noise_scheduler=m.scheduler,
        text_encoder=SDXLTextEncoders(m.text_encoder, m.text_encoder_2) if sdxl else m.text_encoder,
        inference_scheduler_config=dict(m.scheduler.config), prediction_type=m.scheduler.config.prediction_type,
        alphas_cumprod=m.scheduler.alphas_cumprod.float().clone(), family="sdxl" if sdxl else "sd1",
        tokenizer_2=tokenizer_2 if sdxl else None, force_zeros_for_empty_prompt=sdxl,
    )
    # accelerate keeps one process-wide state and refuses a second Accelerator with another mixed precision; a
    # benchmark or test process builds one engine per variant, so start each from a clean state (single process).
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=mixed_precision)
    models.set_attention(m.unet, "sdpa", accelerator.device.type)
    tokens = models.placeholder_tokens(PROJECT, config.subjects)
    state = train.prepare_state(config, components, accelerator, guidance_config(config), tokens)

    # The reference latents' distributions, encoded once (as data.encode_references does for image files).
    with torch.no_grad():
        dist = m.vae.encode(pixel_values.to(accelerator.device, m.vae.dtype)).latent_dist
    scale = m.vae.config.scaling_factor
    if low_memory:
        train.offload_vae(state)  # as `palpcompose train` does: the training step never uses it again
    subjects = [SubjectData(key, models.tokenize(tokenizer, [models.expand_placeholders(subject.prompt, tokens)],
                                                 components.tokenizer_2)[0],
                            dist.mean.float().cpu() * scale, dist.std.float().cpu() * scale, batch, False)
                for key, subject in config.subjects.items()]

    accel.prepare_unet(accelerator.unwrap_model(state.unet), opts)
    if opts.fused_adamw:
        fused = accel.rebuild_adamw(state.optimizer.optimizer, fused=True)
        state.optimizer = accelerator.prepare_optimizer(fused)
        state.lr_scheduler = torch.optim.lr_scheduler.ConstantLR(fused, factor=1.0, total_iters=0)
    if opts.cuda_graphs or opts.graph_personalization:
        state.unet = accel.GraphedTrainingUNet(state.unet, state.lora_layers, opts.cuda_graphs,
                                               opts.graph_personalization)
    generator = torch.Generator("cpu").manual_seed(seed)
    num_timesteps = m.scheduler.config.num_train_timesteps

    def step() -> dict[str, float]:
        with accel.sdpa_context(opts):
            return train.training_step(state, sample_batch(subjects, generator, batch, num_timesteps))

    return state, step
