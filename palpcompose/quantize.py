"""`train.frozen_weights`: the frozen linear weights of the denoiser, and of T5 when it trains a token, stored in 8 bits
during training (docs/flow-memory.md, "8-bit weights: which library" and "T5 in 8 bits").

    check_installed(frozen_weights, where)                     before any work: 8 bits need torchao (the `quant` extra)
    quantize_frozen(denoiser, frozen_weights, dtype)           on the CPU, after the LoRA is attached, before the device
    quantize_frozen_text_encoder(text_encoder, frozen_weights) the same, for the text encoders that qualify (below)

Every frozen `nn.Linear` of the transformer / UNet (a LoRA layer's `base_layer` included; the LoRA's own lora_A /
lora_B never) gets torchao's weight-only storage: int8 with a per-row scale (`Int8WeightOnlyConfig`), or fp8 e4m3
(`Float8WeightOnlyConfig`, kohya's `--fp8_base`); activations, the LoRA, the token rows, convolutions and norms
stay as they are. torchao's linear keeps a dequantized copy of the weight for backward, which would give the saving
back in exactly the pass that needs it; so each such layer runs through `FrozenQuantLinearFn`, which keeps a
reference to the 8-bit weight and dequantizes it again in backward for the input's gradient (a frozen weight needs
no gradient of its own). Quantization is deterministic: a resumed run quantizes the same base model to the same
values. Only training sees it: exports hold the LoRA and the tokens, and render loads the base model as usual.

Of the text encoders, only a flow family's T5 that trains a token (`train.t5_tokens = true`, Flux.1 / SD 3) is
stored in 8 bits: T5-XXL is 4.76 B values (8.9 GiB in bf16, 17.7 in fp32, as a trained-token encoder is kept), on
the device for the whole run, and every one of its linears (attention q, k, v, o; the gated feed-forward's wi_0,
wi_1, wo; all bias-free) is frozen; the gradient reaches the token's row through them (FrozenQuantLinearFn's input
gradient). Its embedding table and the trained rows (`PlaceholderEmbedding`) are no linears and stay as they are.
The CLIP encoders (0.12 B, 0.69 B) stay as they are, and so does a T5 without a token: it encodes the run's prompts
once and leaves for the CPU (encoder_offload.py), so 8 bits would change its cached encodings for no saving during
the steps. T5's 8-bit linears compute in T5's own dtype (the autocast dtype under autocast, as its nn.Linear did).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from palpcompose import torchao_gate
from palpcompose.errors import UserError

DEFAULT = "mixed_precision"
FROZEN_WEIGHTS = (DEFAULT, "int8", "fp8")  # train.frozen_weights's choices
PACKAGE, EXTRA = torchao_gate.TORCHAO, "quant"  # what 8 bits import, and the pip extra of palpcompose that installs it


def check_installed(frozen_weights: str, where) -> None:
    """UserError (exit 2) when train.frozen_weights asks for 8 bits and torchao is not installed. With 8 bits, torchao
    is let through from here on (the command line holds it back otherwise: torchao_gate.py)."""
    if frozen_weights not in FROZEN_WEIGHTS:
        raise UserError(f"{where}: train.frozen_weights must be one of {', '.join(FROZEN_WEIGHTS)}, "
                        f"not {frozen_weights!r}")
    if frozen_weights != DEFAULT:
        torchao_gate.release()
    if frozen_weights != DEFAULT and importlib.util.find_spec(PACKAGE) is None:
        raise UserError(f"{where}: train.frozen_weights = \"{frozen_weights}\" needs the {PACKAGE} package, which is "
                        f"not installed: pip install 'palpcompose[{EXTRA}]' (or set train.frozen_weights = "
                        f"\"{DEFAULT}\")")


class FrozenQuantLinearFn(torch.autograd.Function):
    """y = F.linear(x, W, b) for a frozen 8-bit W that autograd does not save: backward dequantizes W again for
    dL/dx = dL/dy @ W. W and b get no gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight = weight  # the frozen 8-bit parameter itself, not a copy (save_for_backward would pack it)
        ctx.input_dtype = x.dtype
        return F.linear(x, weight, bias)  # torchao's own kernel, as without the wrapper (autograd is off in here)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        grad_input = grad @ ctx.weight.dequantize().to(grad.dtype)
        return grad_input.to(ctx.input_dtype), None, None


class FrozenQuantLinear(nn.Linear):
    """An nn.Linear whose frozen weight torchao stores in 8 bits, run through FrozenQuantLinearFn. quantize_frozen
    turns the quantized layers into this class in place (their parameters, hooks and peft's references stay)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        if torch.is_autocast_enabled(device):  # torchao's linear bypasses autocast: cast as it casts nn.Linear's
            x = x.to(torch.get_autocast_dtype(device))  # input (a layer norm's fp32 output would stay fp32 otherwise)
        return FrozenQuantLinearFn.apply(x, self.weight, self.bias)


def stored_bytes(tensor: torch.Tensor) -> int:
    """The bytes a parameter takes where it is stored: an 8-bit weight's data and scales (torchao's tensors report
    the dtype they compute in, so numel x element_size would count them at 2 bytes a value)."""
    parts = [getattr(tensor, name) for name in getattr(type(tensor), "tensor_data_names", ())] or [tensor]
    return sum(t.numel() * t.element_size() for t in parts)


def frozen_linears(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, layer) of every nn.Linear of `module` that quantize_frozen stores in 8 bits: frozen, a plain weight
    (not already quantized), and not one of the LoRA's own layers."""
    return [(name, m) for name, m in module.named_modules()
            if isinstance(m, nn.Linear) and not m.weight.requires_grad and type(m.weight) is nn.Parameter
            and "lora_" not in name]


def quantize_frozen(model: nn.Module, frozen_weights: str, dtype: torch.dtype | None,
                    parts: list[nn.Module] | None = None) -> int:
    """train.frozen_weights: with "int8" or "fp8", store each frozen linear weight of `model` (only those inside
    `parts`, submodules of `model`, when given) in 8 bits, computing in `dtype` (the training's frozen dtype; None:
    each layer's own), routed through FrozenQuantLinearFn; nothing else changes. Call on the CPU, once the LoRA is
    attached (its base layers are then the frozen linears) and before the weights go to the device. `model` is the
    module accelerate wraps: the 8-bit weights' names in DDP's ignore list are its. The default changes nothing.
    Returns how many layers were quantized."""
    if frozen_weights == DEFAULT:
        return 0
    check_installed(frozen_weights, "train.frozen_weights")
    quantize_, config = _torchao(frozen_weights)
    layers = frozen_linears(model)
    if parts is not None:
        inside = {id(m) for part in parts for m in part.modules()}
        layers = [(name, m) for name, m in layers if id(m) in inside]
    if not layers:
        return 0
    if dtype is not None:
        for _, layer in layers:  # torchao keeps the weight's dtype as the one it computes in; the rest is left as is
            layer.to(dtype=dtype)
    chosen = {id(m) for _, m in layers}
    quantize_(model, config, filter_fn=lambda module, fqn: id(module) in chosen)
    for _, layer in layers:
        layer.__class__ = FrozenQuantLinear
    # Several processes: DistributedDataParallel broadcasts every parameter when it wraps the model, which torchao's
    # tensors do not support. These are frozen, and each process quantizes the same base model to the same values.
    ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    model._ddp_params_and_buffers_to_ignore = ignored + [f"{name}.weight" for name, _ in layers]
    return len(layers)


def quantized_text_encoders(text_encoder: nn.Module) -> list[nn.Module]:
    """The text encoders whose frozen linears train.frozen_weights stores in 8 bits: a flow family's T5 that holds
    a learned token (module docstring: why not CLIP, why not an idle T5). SD's encoders: none. A flow family's
    encoders are models.flow.FlowTextEncoders, known here by its `slots` (this layer sits below models/)."""
    if not hasattr(text_encoder, "slots"):
        return []
    return [encoder for encoder, slot, holds in zip(text_encoder.encoders, text_encoder.slots,
                                                    text_encoder.with_tokens, strict=True)
            if slot.kind == "t5" and holds]


def quantize_frozen_text_encoder(text_encoder: nn.Module, frozen_weights: str) -> int:
    """quantize_frozen for the text encoder accelerate wraps (a flow family's FlowTextEncoders): the frozen linears
    of `quantized_text_encoders`, each computing in its own dtype. Returns how many layers were quantized."""
    parts = quantized_text_encoders(text_encoder)
    return quantize_frozen(text_encoder, frozen_weights, None, parts) if parts else 0


def _torchao(frozen_weights: str):
    """(torchao's quantize_, the weight-only config of `frozen_weights`)."""
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    return quantize_, Int8WeightOnlyConfig() if frozen_weights == "int8" else Float8WeightOnlyConfig()
