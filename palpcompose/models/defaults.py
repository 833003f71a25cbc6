"""Defaults that depend on the base model (docs/schema.md marks those keys "model-dependent"): builtin:toy's own
settings and the native resolution read from a model's configs. project/references.py and project/schema.py
resolve them into the config."""

from __future__ import annotations

import math

from palpcompose import buckets
from palpcompose.models.families import FAMILY_NAMES, family_of
from palpcompose.models.resolve import BaseModelSource, config_reader

# builtin:toy's own training and render settings (docs/evaluation.md, "The PALP study"). The training regime was
# chosen on the TI+LoRA baseline (guidance none) alone, never on PALP's scores: LoRA 1e-3 / embedding 5e-3 is where
# the baseline learns the subject best (3e-3 collapses, 1e-4 barely moves); with references that share a context
# their prompt does not name, batch 4 at 200 steps is where it loses the most of the target prompt (stage A).
# palp.weight (lambda) 3 is PALP's own setting: chosen on PALP's scores on two tuning subjects (stage T) and judged
# on seven others it never saw (stage B: text +0.23 +- 0.08 over the baseline at 0.91x its fidelity); at lambda 1
# the tuning subjects kept only 0.62x the baseline's fidelity. fp32: a 64 px model on a CPU.
TOY_DEFAULTS = {
    "train.steps": 200,
    "train.batch_size": 4,
    "train.learning_rate": 1e-3,
    "train.embedding_learning_rate": 5e-3,
    "train.mixed_precision": "no",
    "palp.weight": 3.0,
    "render.steps": 20,  # the toy model's recommended sampling (docs/toyworld.md)
    "render.guidance_scale": 5.0,
}


# keys a flow family decides (models.flux, models.sd3 `defaults`, and alpha/beta by its guidance)
FLOW_DEFAULT_KEYS = ("train.learning_rate", "train.mixed_precision", "render.steps", "render.guidance_scale",
                     "render.scheduler", "palp.alpha", "palp.beta")


def native_resolution(source: BaseModelSource) -> int | None:
    """The image size the base model was trained at, from its own configs: the UNet's latent `sample_size` times
    the VAE's downsampling factor (2 ** (len(block_out_channels) - 1)): 64 for builtin:toy, 512 for SD 1.x and
    SD 2 base, 768 for SD 2 768-v, 1024 for SDXL. None when the configs cannot be read offline (a single-file
    checkpoint, a hub id that is not cached)."""
    if source.kind not in ("builtin", "folder", "hub"):
        return None
    read = config_reader(source.kind, source.location)  # the reader family detection uses
    unet, vae = read("unet/config.json") or read("transformer/config.json"), read("vae/config.json")
    try:
        # Flux's transformer has no sample_size: FluxPipeline's default_sample_size is 128 latents (1024 px)
        return int((unet or {}).get("sample_size", 128)) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (TypeError, KeyError, ValueError):
        return None


def model_defaults(source: BaseModelSource) -> dict[str, tuple[object, str]]:
    """The defaults that `source` decides: dotted palp.toml key -> (value, why). Keys not listed keep the schema's
    defaults (the paper's Stable Diffusion values)."""
    defaults: dict[str, tuple[object, str]] = {}
    size = native_resolution(source)
    if size is not None:
        defaults["train.resolution"] = (size, f"the native size of {source.spec} (its UNet and VAE configs)")
    family = family_of(source.family)
    defaults.update(family.defaults if source.family in family.names else {})
    if family.flow is not None and source.kind in ("folder", "hub"):
        transformer = config_reader(source.kind, source.location)("transformer/config.json") or {}
        kind = "distilled" if family.flow.distilled(transformer) else "cfg"
        alpha, beta = family.flow.default_alpha_beta[kind]
        why = ("a guidance-distilled model: the values fed to its guidance embedding (docs/method.md)" if
               kind == "distilled" else "real classifier-free guidance: the paper's scales")
        defaults["palp.alpha"], defaults["palp.beta"] = (alpha, why), (beta, why)
    if source.spec == "builtin:toy":
        for key, value in TOY_DEFAULTS.items():
            defaults[key] = (value, "builtin:toy's own default")
    return defaults



def size_alignment(family: str, denoiser_config, vae_config) -> tuple[int, str]:
    """(pixels, why): every side of an image a model of `family` trains on or renders must be a multiple of
    `pixels`: the VAE's scale factor times what the family's denoiser needs of a latent side
    (Family.latent_multiple: Flux.1 packs 2x2 latent patches, SD 3's transformer cuts patch_size ones), and a
    multiple of 8, which diffusers' pipelines need: 16 for Flux.1 and SD 3, 8 for Stable Diffusion. `why` says it in
    words for messages. Configs are dicts or diffusers FrozenDicts."""
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    multiple = family_of(family).latent_multiple(dict(denoiser_config or {}))
    pixels = math.lcm(8, factor * multiple)
    if multiple == 1:
        return pixels, f"{FAMILY_NAMES[family]} (diffusers' pipelines take multiples of 8)"
    return pixels, (f"{FAMILY_NAMES[family]} (its VAE's factor {factor} times the transformer's {multiple}x{multiple} "
                    "latent patches)")


def source_size_alignment(source: BaseModelSource) -> tuple[int, str]:
    """size_alignment of a base model read from its configs without loading it (check, train, render's plan); an
    8x VAE is assumed when they cannot be read offline (a single-file checkpoint, a hub id that is not cached)."""
    denoiser, vae = None, None
    if source.kind in ("builtin", "folder", "hub"):
        read = config_reader(source.kind, source.location)
        denoiser = read("unet/config.json") or read("transformer/config.json")
        vae = read("vae/config.json")
    if not isinstance(vae, dict) or not isinstance(vae.get("block_out_channels"), list):
        vae = {"block_out_channels": [0] * 4}  # 2 ** 3: the 8x VAE of every released model
    return size_alignment(source.family, denoiser, vae)


def bucket_alignment(unet_config, vae_config) -> int:
    """Pixels an aspect-ratio bucket's sides are a multiple of (buckets.alignment), from the UNet's and VAE's
    configs (a dict or a diffusers FrozenDict): 64 for SD 1/2 and SDXL, 16 for builtin:toy."""
    if "block_out_channels" in unet_config:  # a UNet: one halving per down block after the first
        downsamplings = len(unet_config["block_out_channels"]) - 1
    else:  # a flow transformer (Flux.1, SD 3): latents cut into patch_size x patch_size patches
        downsamplings = max(int(unet_config.get("patch_size", 2)).bit_length() - 1, 0)
    return buckets.alignment(2 ** (len(vae_config["block_out_channels"]) - 1), downsamplings)


def source_bucket_alignment(source: BaseModelSource) -> int:
    """bucket_alignment of a base model read from its configs without loading it (`check`); 64, Stable Diffusion's,
    when they cannot be read offline (a single-file checkpoint, a hub id that is not cached)."""
    if source.kind in ("builtin", "folder", "hub"):
        read = config_reader(source.kind, source.location)
        try:
            return bucket_alignment(read("unet/config.json"), read("vae/config.json"))
        except (TypeError, KeyError, ValueError):
            pass
    return buckets.REAL_MODEL_ALIGNMENT


def model_notes(source: BaseModelSource) -> list[str]:
    """What `check` says about the base model's family (a flow family's guidance: what alpha and beta mean)."""
    family = family_of(source.family)
    if family.notes is None or source.family not in family.names or source.kind not in ("folder", "hub"):
        return []
    return [f"{family.names[source.family]}: {note}" for note in family.notes(config_reader(source.kind,
                                                                                            source.location))]
