"""Base models: resolve what `project.base_model` names, load it, and prepare it for PALP.

The package, one job per module, imports flowing down this list:
- `components.py`: loading a pipeline into `Components`, freezing, LoRA, the attention kernel, and the calls the
  training step makes (`tokenize`, `encode_prompt`, `unet_forward`);
- `defaults.py`: the defaults a base model decides (builtin:toy's own settings, the native resolution);
- `resolve.py`: what `base_model` names (builtin:toy, a diffusers folder, a single file, a hub id), checked without
  loading weights, and `detect_family`;
- `families.py`: the families palpcompose trains, in detection order, and what it refuses;
- one module per family (`sd.py`: SD 1.x / 2.x and builtin:toy; `sdxl.py`), each filling in a `family.Family`:
  detection, loading, its Components fields (how prompts are encoded), prediction types, LoRA targets.
A new family is one new module beside sd.py and sdxl.py, listed in families.FAMILIES.

Every name is re-exported here: callers write `from palpcompose import models` / `from palpcompose.models import X`.
"""

from __future__ import annotations

from palpcompose.models.components import (
    ADAPTERS,
    ATTENTION_MODES,
    LORA_TARGET_MODULES,
    Components,
    add_lora,
    encode_prompt,
    freeze,
    load_components,
    load_lora_state_dict,
    load_pipeline,
    lora_layers,
    lora_state_dict,
    set_attention,
    tokenize,
    unet_forward,
)
from palpcompose.models.defaults import (
    FLOW_DEFAULT_KEYS,
    TOY_DEFAULTS,
    bucket_alignment,
    model_defaults,
    model_notes,
    native_resolution,
    size_alignment,
    source_bucket_alignment,
    source_size_alignment,
)
from palpcompose.models.families import (
    FAMILIES,
    FAMILY_NAMES,
    NATIVE_RESOLUTION,
    SDXL_RESOLUTION,
    SUPPORTED_FAMILIES,
    family_of,
)
from palpcompose.models.family import Family
from palpcompose.models.resolve import (
    BUILTIN_DIR,
    BUILTIN_MODELS,
    PICKLED_SUFFIXES,
    BaseModelSource,
    base_model_path,
    config_reader,
    detect_family,
    resolve_base_model,
    uncached_hub_message,
)
from palpcompose.placeholders import expand_placeholders, placeholder_tokens
from palpcompose.tokens import add_placeholder_tokens

__all__ = [
    "ADAPTERS", "ATTENTION_MODES", "BUILTIN_DIR", "BUILTIN_MODELS", "FAMILIES", "FAMILY_NAMES", "FLOW_DEFAULT_KEYS",
    "LORA_TARGET_MODULES", "NATIVE_RESOLUTION",
    "PICKLED_SUFFIXES", "SDXL_RESOLUTION", "SUPPORTED_FAMILIES", "TOY_DEFAULTS", "BaseModelSource", "Components",
    "Family", "add_lora", "add_placeholder_tokens", "base_model_path", "bucket_alignment", "config_reader",
    "detect_family", "encode_prompt",
    "expand_placeholders", "family_of", "freeze", "load_components", "load_lora_state_dict", "load_pipeline",
    "lora_layers", "lora_state_dict", "model_defaults", "model_notes", "native_resolution", "placeholder_tokens",
    "resolve_base_model", "set_attention", "size_alignment", "source_bucket_alignment", "source_size_alignment",
    "tokenize", "uncached_hub_message",
    "unet_forward",
]

