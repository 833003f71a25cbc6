"""Trained weights into a loaded diffusers pipeline: the LoRA into the UNet (peft), the learned tokens into the
tokenizer(s) and text encoder(s), and the LoRA merged into the base weights for a render (`merged_lora`).

Used by `render` (palpcompose/render.py), the ablation and the benchmarks; palpcompose.render re-exports these names.
"""

from __future__ import annotations

import contextlib

import torch

from palpcompose.errors import WeightsDoNotFit
from palpcompose.tokens import set_token_embeddings
from palpcompose.weights import TrainedWeights

ADAPTER_NAME = "palp"


def attach_trained_weights(pipe, weights: TrainedWeights, adapter_name: str = ADAPTER_NAME,
                           lora_scale: float = 1.0) -> None:
    """Put trained weights into a loaded pipeline: the LoRA into `pipe.unet` (peft), each learned token into the
    tokenizer and its embedding into the text encoder's input embedding matrix. Calling it again with other weights
    (e.g. another snapshot) replaces the previous ones. The adapter is left enabled and active, at `lora_scale`
    times its trained strength (set_lora_scale; the tokens are not scaled)."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    unet = denoiser(pipe)
    if adapter_name in getattr(unet, "peft_config", {}):
        unet.delete_adapters(adapter_name)
    dora = {"use_dora": True} if weights.adapter == "dora" else {}  # its magnitude vectors are in weights.lora
    config = LoraConfig(
        r=weights.rank, lora_alpha=weights.lora_alpha, target_modules=list(weights.target_modules), **dora
    )
    unet.add_adapter(config, adapter_name=adapter_name)
    lora = {k: v.to(device=unet.device, dtype=unet.dtype) for k, v in weights.lora.items()}
    result = set_peft_model_state_dict(unet, lora, adapter_name=adapter_name)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in getattr(result, "missing_keys", []) or [] if ".lora_" in k and adapter_name in k]
    if unexpected or missing:
        raise WeightsDoNotFit(
            f"the trained LoRA does not fit this base model ({len(unexpected)} unexpected, {len(missing)} missing "
            f"keys, e.g. {(unexpected + missing)[0]}); render with the base model it was trained on"
        )
    unet.set_adapter(adapter_name)
    unet.enable_adapters()
    set_lora_scale(unet, lora_scale, adapter_name)

    attach_trained_tokens(pipe, weights)


def set_lora_scale(unet, scale: float, adapter_name: str = ADAPTER_NAME) -> None:
    """The adapter's strength: peft's per-layer `set_scale`, scaling = scale * lora_alpha / r (1.0: exactly the
    trained scaling, so the images do not change). The LoRA weights themselves are not touched; `merged_lora` merges
    at this scale."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in unet.modules():
        if isinstance(module, BaseTunerLayer) and hasattr(module, "set_scale"):
            module.set_scale(adapter_name, scale)


def attach_trained_tokens(pipe, weights: TrainedWeights) -> None:
    """Each learned token into the pipeline's tokenizer and its embedding into the text encoder's input embedding
    matrix (a token already there gets its row replaced). WeightsDoNotFit when the weights are of another model family
    or another embedding width."""
    if weights.encoder_keys:  # a flow family: each part of the embedding into the encoder its key names
        pairs = token_slots(pipe, weights)
        for i, (tokenizer, text_encoder) in enumerate(pairs):
            set_token_embeddings(tokenizer, text_encoder, {t: weights.per_encoder(t)[i] for t in weights.embeddings})
        return
    # SDXL: each token into both tokenizers and text encoders, its [clip_l | clip_g] embedding split between them
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    if len(pairs) != max(len(weights.text_encoder_dims), 1):
        trained, here = ("SDXL", "an SD 1.x/2.x") if weights.text_encoder_dims else ("SD 1.x/2.x", "an SDXL")
        raise WeightsDoNotFit(f"the weights were trained on an {trained} model and this is {here} base model; render "
                        "with the base model they were trained on")
    for i, (tokenizer, text_encoder) in enumerate(pairs):
        set_token_embeddings(tokenizer, text_encoder, {t: weights.per_encoder(t)[i] for t in weights.embeddings})


def denoiser(pipe):
    """The pipeline's denoiser, which holds the LoRA: a flow family's transformer, else the UNet."""
    return pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet


def pipeline_family(pipe):
    """The models.Family whose pipeline class `pipe` is."""
    from palpcompose.models import FAMILIES

    return next(f for f in FAMILIES if f.pipeline_class == type(pipe).__name__)


def token_slots(pipe, weights: TrainedWeights) -> list[tuple]:
    """(tokenizer, text encoder) of each part of a flow family's embeddings, in `weights.encoder_keys` order.
    UserError when the weights name an encoder this pipeline does not have (another family's weights)."""
    slots = {slot.key: slot for slot in pipeline_family(pipe).encoders}
    if not slots or any(key not in slots for key in weights.encoder_keys):
        raise WeightsDoNotFit(f"the weights hold embeddings for {', '.join(weights.encoder_keys)}, which this "
                        f"{type(pipe).__name__} does not have; render with the base model they were trained on")
    return [(getattr(pipe, slots[key].tokenizer), getattr(pipe, slots[key].component))
            for key in weights.encoder_keys]


@contextlib.contextmanager
def merged_lora(unet):
    """The LoRA merged into the base weights for the duration (W <- W + scale * B A, peft's `merge`); afterwards
    the base weights are put back bit for bit.

    A render then costs what the base model costs: no extra low-rank matmuls per attention projection at every
    sampling step (docs/performance.md: 1.13x images/s over the unmerged adapter, toy model, CPU). In fp32 the
    images are those of
    the unmerged adapter to rounding (tests/test_render.py); in fp16 the merged weights are rounded to fp16 once.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
    # unmerge() subtracts what merge() added, which is exact only to rounding: keep the base weights (on the CPU, so
    # the GPU's peak does not grow) and put them back bit for bit afterwards
    saved = [layer.get_base_layer().weight.detach().to("cpu", copy=True) for layer in layers]
    for layer in layers:
        layer.merge()
    try:
        yield
    finally:
        with torch.no_grad():
            for layer, weight in zip(layers, saved):
                layer.unmerge()
                layer.get_base_layer().weight.copy_(weight)
