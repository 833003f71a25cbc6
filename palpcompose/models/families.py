"""The model families palpcompose trains, and detecting which one a base model is (configs or a single file's
tensor names, no weights loaded). Each family is one module (sd.py, sdxl.py) declaring a family.Family; FAMILIES
lists them in the order detection tries them. Kinds that no family claims are refused with a message naming them.
"""

from __future__ import annotations

from pathlib import Path

from palpcompose.models import flux, sd, sd3
from palpcompose.models.family import Family, refused
from palpcompose.models.flux import FAMILY as FLUX
from palpcompose.models.sd import FAMILY as SD
from palpcompose.models.sd import UNET
from palpcompose.models.sd3 import FAMILY as SD3
from palpcompose.models.sdxl import FAMILY as SDXL
from palpcompose.models.sdxl import SDXL_RESOLUTION

FAMILIES: tuple[Family, ...] = (FLUX, SD3, SDXL, SD)  # detection order: SD's single-file test is the fallback

FAMILY_NAMES = {key: name for family in FAMILIES for key, name in family.names.items()}
FAMILY_NAMES["unknown"] = "family not verifiable offline"
__all__ = ["FAMILIES", "FAMILY_NAMES", "NATIVE_RESOLUTION", "SDXL_RESOLUTION", "SUPPORTED_FAMILIES",
           "component_file",
           "family_from_index", "family_from_keys", "family_of", "model_names"]
SUPPORTED_FAMILIES = ("Stable Diffusion 1.x and 2.x (epsilon and v-prediction), Stable Diffusion XL base, "
                      "Flux.1 (dev and de-distilled) and Stable Diffusion 3.x text-to-image models")
NATIVE_RESOLUTION = {key: size for family in FAMILIES for key, size in family.native_size.items()}


def family_of(key: str) -> Family:
    """The Family of a detect_family answer; "unknown" (a pickled single file, an uncached hub id) loads as SD."""
    return next((family for family in FAMILIES if key in family.names), SD)


def model_names(kind: str, location: str, index: dict, read) -> tuple[str, ...]:
    """What a model is called, for the kinds told apart only by their name (SD 3.5 Large Turbo has SD 3.5 Large's
    configs): the hub id or the folder's name (`kind` and `location` as resolve.BaseModelSource's), and the
    `_name_or_path` its model_index.json, denoiser and scheduler configs record, if any (a hub download keeps
    them; `save_pretrained` writes none)."""
    names = [location if kind == "hub" else Path(location).resolve().name]
    for config in (index, read("transformer/config.json"), read("unet/config.json"),
                   read("scheduler/scheduler_config.json")):
        if isinstance(config, dict) and isinstance(config.get("_name_or_path"), str):
            names.append(config["_name_or_path"])
    return tuple(dict.fromkeys(n for n in names if n))


def family_from_index(index: dict, read, names: tuple[str, ...] = ()) -> tuple[str, str | None]:
    """(what the pipeline is, in words; its family key or None when unsupported) from model_index.json and the
    UNet's and scheduler's configs (`read(name)` -> a config as JSON, or None), and what it is called (`names`,
    model_names)."""
    name = str(index.get("_class_name", ""))
    unet = read("unet/config.json") or {}
    if "Inpaint" in name or unet.get("in_channels", 4) != 4:
        return refused(f"an inpainting model ({name}, a UNet with {unet.get('in_channels', '?')} input channels)",
                       "palpcompose trains the 4-channel text-to-image UNet")
    for family in FAMILIES:
        found = family.from_index(name, index, unet, read, names)
        if found is not None:
            return found
    return refused(f"a {name} pipeline" if name else "a pipeline whose model_index.json names no _class_name")


def component_file(keys: list[str]) -> str | None:
    """What a .safetensors file holding one component of a diffusers pipeline folder is ("Flux.1's transformer",
    ...), from its tensor names, or None: someone gave base_model the transformer/ or unet/ weights file."""
    return next((found for found in (module.component_file(keys) for module in (flux, sd3, sd)) if found), None)


def family_from_keys(keys: list[str], path: Path) -> tuple[str, str | None]:
    """(what an original-format single-file checkpoint is; its family key or None) from its tensor names, and the
    shape of the UNet's first convolution (9 input channels: inpainting)."""
    unet = UNET
    for family in (FLUX, SD3):  # transformers: recognised by their blocks before the UNet's channels are read
        found = family.from_keys(keys)
        if found is not None:
            return found
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        conv_in = f"{unet}input_blocks.0.0.weight"
        channels = f.get_slice(conv_in).get_shape()[1] if conv_in in keys else 4
    if channels != 4:
        return refused(f"an inpainting checkpoint (a UNet with {channels} input channels)")
    for family in FAMILIES:
        found = family.from_keys(keys)
        if found is not None:
            return found
    return refused("a UNet checkpoint of no known family")  # not reached while SD (the fallback) is listed
