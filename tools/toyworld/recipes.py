"""The base model's training recipes (docs/toyworld.md): `TrainConfig`, the named `RECIPES`, and what follows from a
recipe alone (AdamW's parameter groups, what a branch must share with its source, a checkpoint's recorded recipe).
`train_base` runs them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from palpcompose.toyworld import world


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    batch: int = 512
    lr: float = 8e-4
    warmup_steps: int = 300
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1
    drop_color: float = 0.1  # prompts sometimes leave the colour word out (the render still has a colour)
    drop_pattern: float = 0.3
    vae_fraction: float = 0.15  # shares of --minutes for the VAE and the oracle phases (skipped when resumed)
    oracle_fraction: float = 0.10
    eval_every_s: float = 60.0
    eval_prompts: int = 64
    oracle_eval_images: int = 2048
    vae_batch: int = 256
    oracle_batch: int = 512
    oracle_lr: float = 2e-3
    sample_steps: int = 20
    guidance_scale: float = 3.0
    prediction_type: str = "v_prediction"
    # v2 options; these defaults are v1's recipe
    color2_choices: tuple[str, ...] | None = None  # world.sample_scenes: None = v1 world
    object_scale: tuple[float, float] = world.OBJECT_SCALE  # world.sample_layout: v1's (0.30, 0.50); v2b larger
    pattern_freq: tuple[float, float] = world.PATTERN_FREQ  # world.sample_layout: v1's ranges; v2c fixes both
    pattern_angle: tuple[float, float] = world.PATTERN_ANGLE
    oracle_from: str | None = None  # with init_from: the oracle the gates read (a readout folder); None = shipped
    solid_fraction: float = 0.4
    text_tokens: int = 77  # tokenizer model_max_length = text encoder positions
    init_from: str | None = None  # a diffusers folder or builtin:toy: warm start, its VAE (+ shipped oracle) frozen
    latent_cache: int = 0  # latents computed once (0: render and encode every batch)
    cache_chunk: int = 2048
    cache_every_steps: int = 10  # while the cache is incomplete, one more chunk every this many steps
    lr_schedule: str = "constant"  # or "cosine": to min_lr_frac * lr at total_steps
    total_steps: int = 0
    min_lr_frac: float = 0.1
    text_encoder_lr_mult: float = 1.0  # the text encoder's learning rate over the UNet's (v2d: 5)
    cross_attn_qk_lr_mult: float = 1.0  # the UNet's cross-attention query and key projections over the UNet's (v2e)
    cpu_bf16: bool = False  # bf16 autocast on CPU (measured slower for the UNet step: docs/toyworld.md)
    ckpt_every_s: float = 0.0  # 0: checkpoints only at the end of phases
    gate_every_s: float = 0.0  # 0: no periodic ceiling gate
    gate_subjects: int = 3
    gate_old_bar_prompts: int = 64
    log_every_s: float = 60.0


RECIPES = {
    "v1": TrainConfig(),
    # decided from the v1 diagnosis (docs/toyworld.md, "v2 diagnosis" and "v2 recipe")
    "v2": TrainConfig(
        batch=128, lr=4e-4, warmup_steps=200, drop_color=0.1, drop_pattern=0.05, color2_choices=("white", "black"),
        text_tokens=32, init_from="builtin:toy", latent_cache=65_536, lr_schedule="cosine", total_steps=5_000,
        eval_every_s=1e12, ckpt_every_s=300.0, gate_every_s=1800.0, gate_subjects=3, gate_old_bar_prompts=64,
        log_every_s=60.0,
    ),
    # decided from the two capacity probes and the v2b probe (docs/toyworld.md, "v2b: larger objects")
    "v2b": TrainConfig(
        batch=128, lr=2e-4, warmup_steps=200, drop_color=0.1, drop_pattern=0.05, color2_choices=("white", "black"),
        object_scale=(0.50, 0.70), text_tokens=32, init_from="builtin:toy", latent_cache=65_536,
        lr_schedule="cosine", total_steps=3_000, eval_every_s=1e12, ckpt_every_s=300.0, gate_every_s=1800.0,
        gate_subjects=3, gate_old_bar_prompts=64, log_every_s=60.0,
    ),
    # decided from the loss-gap diagnosis (docs/toyworld.md, "v2c: one texture per pattern word")
    "v2c": TrainConfig(
        batch=128, lr=2e-4, warmup_steps=200, drop_color=0.1, drop_pattern=0.05, color2_choices=("white", "black"),
        object_scale=(0.50, 0.70), pattern_freq=(2.2, 2.2), pattern_angle=(0.3, 0.3), solid_fraction=0.2,
        text_tokens=32, init_from="builtin:toy", latent_cache=65_536, lr_schedule="cosine", total_steps=3_000,
        eval_every_s=1e12, ckpt_every_s=300.0, gate_every_s=1800.0, gate_subjects=3, gate_old_bar_prompts=64,
        log_every_s=60.0,
    ),
}
# decided from what v2c's run showed: the text encoder carries the pattern weakly where the UNet reads (docs/
# toyworld.md, "v2d"); v2c's world, data and UNet rate, so the two runs compare at equal steps
RECIPES["v2d"] = replace(RECIPES["v2c"], text_encoder_lr_mult=5.0)
# the lever probe (docs/toyworld.md, "v2e: the lever probe"): arms branched from a v2d checkpoint with fresh AdamW
# moments (hence the short warm-up); "v2d-b" is the control, each other arm changes one thing
RECIPES["v2d-b"] = replace(RECIPES["v2d"], warmup_steps=20)
RECIPES["v2e"] = replace(RECIPES["v2d-b"], cross_attn_qk_lr_mult=10.0)
RECIPES["v2e-lr"] = replace(RECIPES["v2d-b"], lr=6e-4)


def param_groups(unet, text_encoder, cfg: TrainConfig) -> list[dict]:
    """AdamW's parameter groups, each with its `lr_mult` over `cfg.lr`. With every multiplier at 1 one group, and
    with only the text encoder's changed two (UNet, text encoder): the orders older checkpoints' moments were saved in.
    """
    if cfg.cross_attn_qk_lr_mult == 1.0:
        groups = [{"params": list(unet.parameters()), "lr_mult": 1.0}]
    else:  # the cross-attention's to_q / to_k (attn2 in every transformer block) apart
        qk = [p for n, p in unet.named_parameters() if ".attn2.to_q." in n or ".attn2.to_k." in n]
        ids = {id(p) for p in qk}
        groups = [{"params": [p for p in unet.parameters() if id(p) not in ids], "lr_mult": 1.0},
                  {"params": qk, "lr_mult": cfg.cross_attn_qk_lr_mult}]
    if cfg.text_encoder_lr_mult == 1.0 and len(groups) == 1:
        groups[0]["params"] += list(text_encoder.parameters())
    else:
        groups.append({"params": list(text_encoder.parameters()), "lr_mult": cfg.text_encoder_lr_mult})
    return groups


# what a branch must share with its source: the data (world, seed, cached latents), the text positions, the
# objective and the instrument; everything else (rates, schedule, sizes) is what a branch may change
BRANCH_KEEPS = ("seed", "solid_fraction", "color2_choices", "object_scale", "pattern_freq", "pattern_angle",
                "latent_cache", "cache_chunk", "text_tokens", "prediction_type", "oracle_from", "init_from")


def branch_mismatch(source: TrainConfig, cfg: TrainConfig) -> str:
    """'' when `cfg` may branch from a checkpoint of `source`, else which setting differs."""
    for name in BRANCH_KEEPS:
        if getattr(source, name) != getattr(cfg, name):
            return (f"the recipe's {name} ({getattr(cfg, name)!r}) differs from the checkpoint's "
                    f"({getattr(source, name)!r}); a branch keeps its source's data")
    return ""


def config_from_state(saved: dict) -> TrainConfig:
    """The TrainConfig a checkpoint recorded (lists back to tuples; unknown keys ignored)."""
    names = {f.name for f in fields(TrainConfig)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in names}
    return replace(TrainConfig(), **values)
