"""Stable Diffusion 1.x and 2.x (epsilon and v-prediction), and builtin:toy (an SD-1-like model): one CLIP text
encoder whose last hidden state (B, 77, D) the UNet reads."""

from __future__ import annotations

from palpcompose.models.family import Family

UNET = "model.diffusion_model."  # the UNet's key prefix in an original-layout single file
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the UNet's attention projections (SD 1/2 and SDXL)


def from_index(name: str, index: dict, unet: dict, read, names: tuple[str, ...]) -> tuple[str, str] | None:
    if name != "StableDiffusionPipeline":
        return None
    scheduler = read("scheduler/scheduler_config.json") or {}
    if scheduler.get("prediction_type") == "v_prediction":
        return "SD 2.x (v-prediction)", "sd2-v"
    return ("SD 2.x", "sd2") if unet.get("cross_attention_dim") == 1024 else ("SD 1.x", "sd1")


def from_keys(keys: list[str]) -> tuple[str, str]:
    """The fallback of single-file detection (families.py tries SDXL first): SD 2.x by its OpenCLIP ViT-H text
    encoder, else SD 1.x. A v-prediction SD 2 file cannot be told apart by its keys."""
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "SD 2.x", "sd2"
    return "SD 1.x", "sd1"


def component_file(keys: list[str]) -> str | None:
    """What a .safetensors file of a diffusers UNet2DConditionModel's weights alone is (unet/ of a diffusers folder;
    a VAE's down blocks sit under encoder.), or None."""
    if any(k.startswith("down_blocks.") for k in keys) and any(k.startswith("conv_in.") for k in keys):
        return "a Stable Diffusion UNet"
    return None


def components(pipe) -> dict:
    return {"text_encoder": pipe.text_encoder}


FAMILY = Family(
    names={"toy": "the built-in toy model", "sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x",
           "sd2-v": "Stable Diffusion 2.x (v-prediction)"},
    native_size={"toy": 64, "sd1": 512, "sd2": 512, "sd2-v": 768},
    from_index=from_index,
    from_keys=from_keys,
    pipeline_class="StableDiffusionPipeline",
    pipeline_kwargs={"safety_checker": None, "requires_safety_checker": False},
    single_file_kwargs={},
    folders=("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    components=components,
    prediction_types=("epsilon", "v_prediction"),
    lora_targets=LORA_TARGETS,
)
