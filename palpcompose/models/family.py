"""What a model family is to palpcompose: the `Family` record each family's module fills in (sd.py, sdxl.py).

A family is the set of base models that load, encode prompts and train the same way. Its module declares:
- how it is recognised: `from_index` (a diffusers folder's or cached hub model's model_index.json and configs) and
  `from_keys` (a single .safetensors file's tensor names), each answering (what it is, in words; its family key)
  or None when the model is not of this family; a key of None refuses the model with the words as the reason;
- the names of its keys (`names`, for `check` and messages) and the image side each was trained at (`native_size`);
- how it loads: the diffusers pipeline class and its keywords, the components a diffusers folder must hold;
- how prompts are encoded: `components(pipe)`, the family's own fields of models.Components (the text encoder as
  one module, a second tokenizer, whether the empty prompt is zeros);
- the prediction types it trains (`prediction_types`) and its LoRA target modules (`lora_targets`).
families.py lists the families in the order detection tries them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    names: dict[str, str]  # family key -> its name in messages: {"sd1": "Stable Diffusion 1.x", ...}
    native_size: dict[str, int]  # family key -> the image side the models were trained at
    # (class name, model_index.json, the UNet's config or {}, read) -> (what, key) | None; read(name) -> JSON or None
    from_index: Callable[[str, dict, dict, Callable], tuple[str, str | None] | None]
    # (tensor names of an original-layout single file) -> (what, key) | None
    from_keys: Callable[[list[str]], tuple[str, str | None] | None]
    pipeline_class: str  # the diffusers pipeline class that loads a model of the family
    pipeline_kwargs: dict  # extra keywords of its from_pretrained
    single_file_kwargs: dict  # extra keywords of its from_single_file
    folders: tuple[str, ...]  # the components a diffusers folder (and its model_index.json) must hold
    components: Callable[[object], dict]  # pipeline -> the family's own fields of models.Components
    prediction_types: tuple[str, ...]  # scheduler prediction types it trains
    lora_targets: tuple[str, ...]  # the modules that get a LoRA adapter
