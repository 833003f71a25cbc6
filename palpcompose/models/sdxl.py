"""Stable Diffusion XL base: two CLIP text encoders read as one module (conditioning.SDXLTextEncoders), the pooled
embedding and size `time_ids` in the UNet's added conditioning, 1024 px (docs/sdxl.md). Refiners are refused."""

from __future__ import annotations

from palpcompose.conditioning import SDXLTextEncoders
from palpcompose.models.family import Family, refused
from palpcompose.models.sd import FAMILY as SD
from palpcompose.models.sd import LORA_TARGETS, UNET

SDXL_RESOLUTION = 1024  # SDXL's native image side; train.resolution's default for an SDXL base_model


def from_index(name: str, index: dict, unet: dict, read, names: tuple[str, ...]) -> tuple[str, str | None] | None:
    if not name.startswith("StableDiffusionXL"):
        return None
    encoders = [index.get(k) for k in ("text_encoder", "text_encoder_2")]
    if not all(isinstance(e, list) and e and e[0] for e in encoders) or index.get("requires_aesthetics_score"):
        return refused(f"an SDXL refiner ({name}: no first text encoder, aesthetic-score conditioning; it only "
                       "post-processes an SDXL base model's images)", "use the SDXL base model")
    return "SDXL", "sdxl"


def from_keys(keys: list[str]) -> tuple[str, str | None] | None:
    if not any(k.startswith(f"{UNET}label_emb.") for k in keys):  # SDXL's added (pooled text + size) conditioning
        return None
    if not any(k.startswith("conditioner.embedders.1.") for k in keys) and any(
            k.startswith("conditioner.embedders.0.model.") for k in keys):
        return refused("an SDXL refiner checkpoint (one OpenCLIP text encoder)", "use the SDXL base model")
    return "SDXL", "sdxl"


def components(pipe) -> dict:
    return {
        "text_encoder": SDXLTextEncoders(pipe.text_encoder, pipe.text_encoder_2),
        "tokenizer_2": pipe.tokenizer_2,
        "force_zeros_for_empty_prompt": bool(pipe.config.get("force_zeros_for_empty_prompt", True)),
    }


FAMILY = Family(
    names={"sdxl": "Stable Diffusion XL"},
    native_size={"sdxl": SDXL_RESOLUTION},
    from_index=from_index,
    from_keys=from_keys,
    pipeline_class="StableDiffusionXLPipeline",
    pipeline_kwargs={"add_watermarker": False},  # no safety checker in SDXL; no invisible watermark on our renders
    single_file_kwargs={"add_watermarker": False},
    folders=(*SD.folders, "text_encoder_2", "tokenizer_2"),
    components=components,
    prediction_types=SD.prediction_types,
    lora_targets=LORA_TARGETS,
)
