"""8-bit frozen weights (train.frozen_weights, palpcompose/quantize.py): what one LoRA training pass keeps, on
Flux.1-dev's real widths with a few blocks (random weights, no download), for each way of storing the frozen weights.

    python -m benchmarks.quant_memory --device cpu --double 1 --single 1 --resolution 256 --text-tokens 64
    python -m benchmarks.quant_memory --device cuda --json       # benchmarks/gpu_suite.sh's `quant` step

Variants: `bf16` (nothing quantized, as train.frozen_weights = "mixed_precision" under bf16); `int8+torchao`
(torchao's int8 weight-only linear alone: it keeps a bf16 copy of each weight for backward); `int8` and `fp8` (the
product's path: quantize_frozen, each frozen linear through FrozenQuantLinearFn). The LoRA (rank 32 on the family's
targets, fp32) is attached first, as training does; the pass runs under bf16 autocast, batch 1, flash-like SDPA.

Per variant: `weights_gib`, the transformer's parameter bytes (8-bit data and scales for the quantized ones);
`saved_mib`, what autograd keeps for backward in one forward with grad (saved-tensor hooks, each storage once,
parameters excluded: benchmarks.flow_memory.count_saved); on CUDA also `peak_gib`, torch.cuda.max_memory_allocated
over forward + backward above what was allocated before it, and `pass_s`, the time of that pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from benchmarks import archs
from benchmarks._cli import run_main
from benchmarks.flow_memory import count_saved, transformer_blocks, transformer_inputs
from palpcompose import models, quantize

VARIANTS = ("bf16", "int8+torchao", "int8", "fp8")
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
        with torch.no_grad():
            forward()  # cuBLAS workspaces: allocated once, before the measurement
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        forward().float().square().mean().backward()
        torch.cuda.synchronize()
        result["pass_s"] = time.perf_counter() - t0
        result["peak_gib"] = (torch.cuda.max_memory_allocated() - before) / GIB
    return result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quant_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--double", type=int, default=2, help="Flux double-stream blocks (FLUX.1-dev has 19)")
    p.add_argument("--single", type=int, default=2, help="Flux single-stream blocks (FLUX.1-dev has 38)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--text-tokens", type=int, default=None, help="T5 tokens (default: FLUX.1-dev's 512)")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    quantize.check_installed("int8", "benchmarks.quant_memory")
    spec = archs.flow_arch_spec("flux1-dev")
    spec = dataclasses.replace(spec, transformer={**spec.transformer, "num_layers": args.double,
                                                  "num_single_layers": args.single},
                               t5_max_length=args.text_tokens or spec.t5_max_length)
    device = torch.device(args.device)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "blocks": [args.double, args.single], "resolution": args.resolution,
              "text_tokens": spec.t5_max_length, "rank": args.rank, "variants": {}}
    for variant in args.variants.split(","):
        model = build(spec, variant, args.rank, device)
        report["variants"][variant] = row = measure(model, spec, args, device)
        print(f"{variant:>13}: weights {row['weights_gib']:.3f} GiB, saved for backward {row['saved_mib']:.1f} MiB"
              + (f", peak {row['peak_gib']:.3f} GiB, {row['pass_s']:.3f} s" if "peak_gib" in row else ""),
              flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return report


def main(argv=None) -> int:
    return run_main(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
