"""What a model family is to palpcompose: the `Family` record each family's module fills in (sd.py, sdxl.py).

A family is the set of base models that load, encode prompts and train the same way. Its module declares:
- how it is recognised: `from_index` (a diffusers folder's or cached hub model's model_index.json and configs) and
  `from_keys` (a single .safetensors file's tensor names), each answering (what it is, in words; its family key)
  or None when the model is not of this family; a key of None refuses the model with the words as the reason
  (`refused(kind, fix)` words them);
- the names of its keys (`names`, for `check` and messages) and the image side each was trained at (`native_size`);
- how it loads: the diffusers pipeline class and its keywords, the components a diffusers folder must hold;
- how prompts are encoded: `components(pipe)`, the family's own fields of models.Components (the text encoder as
  one module, a second tokenizer, whether the empty prompt is zeros);
- the prediction types it trains (`prediction_types`) and its LoRA target modules (`lora_targets`);
- what the training step, render and export read of a flow-matching family (flux.py, sd3.py): `objective`
  ("diffusion": epsilon or v-prediction, read from the scheduler; "flow": rectified-flow velocity), the prompt
  encoders (`encoders`: one EncoderSlot each, its tokenizer, its key in exported embeddings, its sequence length),
  the denoiser's call and prompt encoding (`flow`: a FlowSpec), its resolved training defaults with their sources
  (`defaults`) and what `check` says about it (`notes`);
- the samplers it renders with (`samplers`, keys of sampling.SCHEDULERS);
- what the latent sides must be a multiple of (`latent_multiple`: the transformer's patches), which makes the image
  sizes it takes.
families.py lists the families in the order detection tries them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from palpcompose.choices import SD_SCHEDULER_NAMES


@dataclass(frozen=True)
class Family:
    names: dict[str, str]  # family key -> its name in messages: {"sd1": "Stable Diffusion 1.x", ...}
    native_size: dict[str, int]  # family key -> the image side the models were trained at
    # (class name, model_index.json, the UNet's config or {}, read, names) -> (what, key) | None; read(name) -> JSON
    # or None; names: what the model is called (families.model_names), for kinds told apart only by their name
    from_index: Callable[[str, dict, dict, Callable, tuple[str, ...]], tuple[str, str | None] | None]
    # (tensor names of an original-layout single file) -> (what, key) | None
    from_keys: Callable[[list[str]], tuple[str, str | None] | None]
    pipeline_class: str  # the diffusers pipeline class that loads a model of the family
    pipeline_kwargs: dict  # extra keywords of its from_pretrained
    single_file_kwargs: dict  # extra keywords of its from_single_file
    folders: tuple[str, ...]  # the components a diffusers folder (and its model_index.json) must hold
    components: Callable[[object], dict]  # pipeline -> the family's own fields of models.Components
    prediction_types: tuple[str, ...]  # scheduler prediction types it trains
    lora_targets: tuple[str, ...]  # the modules that get a LoRA adapter
    objective: str = "diffusion"  # "diffusion" (epsilon / v_prediction, from the scheduler config) | "flow"
    encoders: tuple[EncoderSlot, ...] = ()  # flow families: every text encoder that reads the prompt, in order
    flow: FlowSpec | None = None  # flow families: the denoiser's call, prompt encoding, noise levels
    defaults: dict = field(default_factory=dict)  # dotted palp.toml key -> (value, why): this family's defaults
    notes: Callable[[Callable], list[str]] | None = None  # read -> lines `check` prints about the model
    # denoiser config -> what each latent side must be a multiple of (a UNet: 1; Flux.1's 2x2 packing: 2; SD 3: its
    # patch_size); times the VAE's factor, the image sides it trains on and renders (models.size_alignment)
    latent_multiple: Callable[[dict], int] = lambda config: 1
    samplers: tuple[str, ...] = SD_SCHEDULER_NAMES  # the render.scheduler values it renders with, the first the default


def refused(kind: str, fix: str = "") -> tuple[str, None]:
    """A model palpcompose does not train, as from_index / from_keys answer it: what it is, said to be untrainable
    right after it (so the phrase never lands on the advice), then what to use instead. resolve.detect_family adds
    the families palpcompose does train."""
    return f"{kind}, which palpcompose cannot train" + (f"; {fix}" if fix else ""), None


@dataclass(frozen=True)
class EncoderSlot:
    """One text encoder that reads the prompt: a component of the pipeline and its tokenizer."""

    component: str  # the pipeline attribute: "text_encoder", "text_encoder_2", "text_encoder_3"
    tokenizer: str  # "tokenizer", ...
    key: str  # this encoder's key in exported embeddings (the pivotal-tuning layout): "clip_l" | "clip_g" | "t5"
    kind: str  # "clip" | "t5"
    max_length: int  # tokens it reads (CLIP 77; T5 512 for Flux.1, 256 for SD 3, as their pipelines default)


@dataclass(frozen=True)
class FlowSpec:
    """What a rectified-flow family's training step and previews call (docs/method.md "PALP for rectified flow").

    forward(transformer, latents (B, C, h, w), sigma (B,), cond, guidance) -> velocity (B, C, h, w): one pass;
    `guidance` is the value fed to a guidance-distilled model's embedding, None for real CFG.
    encode(encoders, ids per encoder) -> conditioning.Conditioning (embeds, pooled).
    distilled(transformer config) -> whether the model is guidance-distilled (one pass per guided prediction)."""

    forward: Callable
    encode: Callable
    distilled: Callable[[dict], bool]
    default_alpha_beta: dict  # {"distilled": (alpha, beta), "cfg": (alpha, beta)}: docs/method.md
    # (scale, distilled, negative prompt) -> the family pipeline's guidance keywords for a render
    render_kwargs: Callable[[float, bool, str], dict]
    t5_prompt: str  # the pipeline keyword of T5's prompt ("prompt_2" Flux.1, "prompt_3" SD 3)
