"""8-bit frozen weights (train.frozen_weights, palpcompose/quantize.py): what one LoRA training pass keeps, on
Flux.1-dev's real widths with a few blocks (random weights, no download), for each way of storing the frozen weights;
with `--model t5`, what y_P's pass through T5-XXL keeps when T5 trains a token (train.t5_tokens).

    python -m benchmarks.quant_memory --device cpu --double 1 --single 1 --resolution 256 --text-tokens 64
    python -m benchmarks.quant_memory --device cuda --json       # benchmarks/gpu_suite.sh's `quant` step
    python -m benchmarks.quant_memory --model t5 --device cpu --t5-layers 1   # T5-XXL's widths, 1 of its 24 layers
    python -m benchmarks.quant_memory --model t5 --device cpu --t5-layers 2 --variants fp32+ckpt,int8+ckpt

Variants: `bf16` (nothing quantized, as train.frozen_weights = "mixed_precision" under bf16); `int8+torchao`
(torchao's int8 weight-only linear alone: it keeps a bf16 copy of each weight for backward); `int8` and `fp8` (the
product's path: quantize_frozen, each frozen linear through FrozenQuantLinearFn). The LoRA (rank 32 on the family's
targets, fp32) is attached first, as training does; the pass runs under bf16 autocast, batch 1, flash-like SDPA.

Per variant: `weights_gib`, the transformer's parameter bytes (8-bit data and scales for the quantized ones);
`saved_mib`, what autograd keeps for backward in one forward with grad (saved-tensor hooks, each storage once,
parameters excluded: benchmarks.flow_memory.count_saved); on CUDA also `peak_gib`, torch.cuda.max_memory_allocated
over forward + backward above what was allocated before it, and `pass_s`, the time of that pass.

`--model t5`: T5-XXL's encoder (benchmarks/archs.py T5_XXL) with `--t5-layers` of its 24 layers, fp32 as training
keeps an encoder that trains a token (step.place_and_optimize casts only the idle ones), then stored as the variant
says: `fp32` (train.frozen_weights = "mixed_precision"), `bf16` (for comparison: what a cast would keep),
`int8+torchao`, `int8`, `fp8` (quantize_frozen_text_encoder's path: every linear through FrozenQuantLinearFn, each
computing in T5's dtype); `fp32+ckpt`, `int8+ckpt`: the same with T5's blocks recomputed in backward, as
train.recomputes_activations does to a T5 that trains a token (models.flow.recompute_t5_blocks). One forward of
`--text-tokens` tokens (default Flux.1's 512) with grad to the token embeddings (standing for the learned row), under
bf16 autocast as the step runs it. Per variant: `weights_gib` (all of T5's parameters as built), `linears_gib` (its
frozen linear weights), `saved_mib` (what autograd keeps), and the same extrapolated to the 24 layers of T5-XXL
(`*_xxl`: outside the layers + 24 x the mean layer). A `+ckpt` variant's `saved_mib` is what its forward keeps (the
blocks' inputs: each block's hidden states, and the position bias block 0 computes and every later block is passed);
`recompute_mib` is one block's activations while backward recomputes it (the largest block of the same model's
plain forward, counted before the blocks are wrapped); `saved_xxl_mib` is what the forward keeps + block 0's inputs
(the hidden states: what each further block adds) for each of T5-XXL's further layers + `recompute_mib`. These
variants are built with 2 layers when `--t5-layers` is 1 (block 1 is the first that is passed the position bias).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from benchmarks import archs
from benchmarks._cli import run_main
from benchmarks.flow_memory import _storage_owner, count_saved, transformer_blocks, transformer_inputs
from palpcompose import models, quantize
from palpcompose.models.flow import recompute_t5_blocks

VARIANTS = ("bf16", "int8+torchao", "int8", "fp8")
T5_VARIANTS = ("fp32", "bf16", "int8+torchao", "int8", "fp8", "fp32+ckpt", "int8+ckpt")
RECOMPUTED = "+ckpt"  # a T5 variant's suffix: its blocks recomputed in backward
T5_XXL_LAYERS = archs.T5_XXL["num_layers"]
GIB, MIB = 2**30, 2**20


def build(spec: archs.FlowArchSpec, variant: str, rank: int, device: torch.device):
    """The transformer in bf16 on the CPU with its LoRA (fp32), stored as `variant` says, then moved to `device`."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # no fp32 copy of the random weights
    try:
        model = FluxTransformer2DModel(**spec.transformer).requires_grad_(False)
    finally:
        torch.set_default_dtype(default)
    models.add_lora(model, rank, float(rank), models.family_of("flux").lora_targets)
    if variant == "int8+torchao":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        chosen = {id(m) for _, m in quantize.frozen_linears(model)}
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda module, fqn: id(module) in chosen)
    elif variant != "bf16":
        quantize.quantize_frozen(model, variant, torch.bfloat16)
    return model.to(device)


def build_t5(layers: int, variant: str, device: torch.device):
    """T5-XXL's encoder with `layers` layers, fp32 on the CPU, frozen (eval mode, as models.freeze leaves it), stored
    as `variant` says (its `+ckpt` is measure_t5's to apply), then on `device`."""
    from transformers import T5Config, T5EncoderModel

    variant = variant.removesuffix(RECOMPUTED)
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(**{**archs.T5_XXL, "num_layers": layers})).requires_grad_(False).eval()
    if variant == "bf16":
        t5.to(torch.bfloat16)
    elif variant == "int8+torchao":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        chosen = {id(m) for _, m in quantize.frozen_linears(t5)}
        quantize_(t5, Int8WeightOnlyConfig(), filter_fn=lambda module, fqn: id(module) in chosen)
    elif variant != "fp32":
        quantize.quantize_frozen(t5, variant, None)  # what quantize_frozen_text_encoder does to a T5 with a token
    return t5.to(device)


def measure_t5(t5, args, device: torch.device, recomputed: bool = False) -> dict:
    """Weights and what autograd keeps in one forward with grad to the token embeddings, under bf16 autocast;
    `recomputed`: with the blocks wrapped by recompute_t5_blocks after a first, plain count (module docstring)."""
    from benchmarks.flow_memory import encoder_layers

    layers = encoder_layers(t5)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, t5.config.vocab_size, (1, args.text_tokens or 512), generator=g).to(device)
    embeds = t5.get_input_embeddings()(ids).detach().requires_grad_(True)  # stands for the learned row

    def forward():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return t5(inputs_embeds=embeds).last_hidden_state

    inside = {id(p) for layer in layers for p in layer.parameters()}
    weights = parameter_bytes(t5)
    in_layers = sum(quantize.stored_bytes(p) for p in t5.parameters() if id(p) in inside)
    linears = sum(quantize.stored_bytes(m.weight) for m in t5.modules() if isinstance(m, torch.nn.Linear))
    saved = count_saved(t5, layers, forward, autocast=False)
    scale = T5_XXL_LAYERS / len(layers)
    result = {"weights_gib": weights / GIB, "linears_gib": linears / GIB, "saved_mib": saved.full / MIB,
              "weights_xxl_gib": (weights - in_layers + in_layers * scale) / GIB,
              "linears_xxl_gib": linears * scale / GIB,
              "saved_xxl_mib": (saved.outside + (saved.inputs_saved + sum(saved.blocks)) * scale) / MIB}
    if recomputed:
        recompute = max(saved.blocks)  # one block's activations, alive while backward recomputes it
        recompute_t5_blocks(t5)
        kept, inputs = count_saved(t5, layers, forward, autocast=False), block_input_bytes(layers, forward)
        result.update(saved_mib=kept.full / MIB, recompute_mib=recompute / MIB,
                      saved_xxl_mib=(kept.full + inputs[0] * (T5_XXL_LAYERS - len(layers)) + recompute) / MIB)
    if device.type == "cuda":
        result.update(cuda_pass(forward))
    return result


def cuda_pass(forward) -> dict:
    """One forward and backward on CUDA: its time and the memory it allocated at its peak, above what was there."""
    with torch.no_grad():
        forward()  # cuBLAS workspaces: allocated once, before the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    forward().float().square().mean().backward()
    torch.cuda.synchronize()
    return {"pass_s": time.perf_counter() - t0, "peak_gib": (torch.cuda.max_memory_allocated() - before) / GIB}


def block_input_bytes(blocks: list, forward) -> list[int]:
    """Per block, in call order, the bytes of the tensors passed to it that no earlier block was passed (each storage
    once): what per-block checkpointing keeps for it."""
    seen: set[int] = set()
    per_block = []

    def enter(block, args, kwargs):
        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        owners = {id(o): o for o in map(_storage_owner, tensors)}
        new = [o for key, o in owners.items() if key not in seen]
        seen.update(owners)
        per_block.append(sum(o.numel() * o.element_size() for o in new))

    handles = [b.register_forward_pre_hook(enter, with_kwargs=True) for b in blocks]
    try:
        with torch.no_grad():  # what is passed, not what is saved: no graph needed
            forward()
    finally:
        for h in handles:
            h.remove()
    return per_block


def parameter_bytes(model) -> int:
    return sum(quantize.stored_bytes(p) for p in model.parameters())


def measure(model, spec: archs.FlowArchSpec, args, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(1)
    inputs = {k: torch.randn(v.shape, generator=g).to(device, v.dtype)
              for k, v in transformer_inputs(spec, args.resolution, 1).items()}
    inputs["timestep"] = torch.full_like(inputs["timestep"], 0.5)
    inputs["guidance"] = torch.full_like(inputs["guidance"], 3.5)

    def forward():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return model(**inputs, return_dict=False)[0]

    result = {"weights_gib": parameter_bytes(model) / GIB}
    saved = count_saved(model, transformer_blocks(model), forward, autocast=False)
    result["saved_mib"] = saved.full / MIB
    if device.type == "cuda":
        result.update(cuda_pass(forward))
    return result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quant_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("flux", "t5"), default="flux",
                   help="the Flux.1-dev transformer, or T5-XXL training a token (train.t5_tokens)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--t5-layers", type=int, default=1, help=f"--model t5: T5 layers (T5-XXL has {T5_XXL_LAYERS})")
    p.add_argument("--double", type=int, default=2, help="Flux double-stream blocks (FLUX.1-dev has 19)")
    p.add_argument("--single", type=int, default=2, help="Flux single-stream blocks (FLUX.1-dev has 38)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--text-tokens", type=int, default=None, help="T5 tokens (default: FLUX.1-dev's 512)")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--variants", default=None,
                   help=f"default: {','.join(VARIANTS)} (flux), {','.join(T5_VARIANTS)} (t5)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    quantize.check_installed("int8", "benchmarks.quant_memory")
    if args.model == "t5":
        return run_t5(args)
    spec = archs.flow_arch_spec("flux1-dev")
    spec = dataclasses.replace(spec, transformer={**spec.transformer, "num_layers": args.double,
                                                  "num_single_layers": args.single},
                               t5_max_length=args.text_tokens or spec.t5_max_length)
    device = torch.device(args.device)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "blocks": [args.double, args.single], "resolution": args.resolution,
              "text_tokens": spec.t5_max_length, "rank": args.rank, "variants": {}}
    for variant in (args.variants or ",".join(VARIANTS)).split(","):
        model = build(spec, variant, args.rank, device)
        report["variants"][variant] = row = measure(model, spec, args, device)
        print(f"{variant:>13}: weights {row['weights_gib']:.3f} GiB, saved for backward {row['saved_mib']:.1f} MiB"
              + (f", peak {row['peak_gib']:.3f} GiB, {row['pass_s']:.3f} s" if "peak_gib" in row else ""),
              flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return report


def run_t5(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "model": "t5-xxl",
              "layers": args.t5_layers, "text_tokens": args.text_tokens or 512, "variants": {}}
    for variant in (args.variants or ",".join(T5_VARIANTS)).split(","):
        recomputed = variant.endswith(RECOMPUTED)
        layers = max(args.t5_layers, 2) if recomputed else args.t5_layers
        t5 = build_t5(layers, variant, device)
        report["variants"][variant] = row = {"layers": layers, **measure_t5(t5, args, device, recomputed)}
        print(f"{variant:>13}: {layers} layer(s): weights {row['weights_gib']:.3f} GiB (linears "
              f"{row['linears_gib']:.3f}), saved for backward {row['saved_mib']:.1f} MiB"
              + (f" + {row['recompute_mib']:.1f} MiB for the block recomputed" if "recompute_mib" in row else "")
              + f"; T5-XXL's {T5_XXL_LAYERS}: weights {row['weights_xxl_gib']:.2f} GiB (linears "
              f"{row['linears_xxl_gib']:.2f}), saved {row['saved_xxl_mib']:.0f} MiB"
              + (f"; peak {row['peak_gib']:.3f} GiB, {row['pass_s']:.3f} s" if "peak_gib" in row else ""), flush=True)
        del t5
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return report


def main(argv=None) -> int:
    return run_main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
