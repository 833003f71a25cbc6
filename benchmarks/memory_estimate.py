"""The memory estimate `palpcompose train` prints, for an architecture's real shapes, without a GPU or its memory.

    python -m benchmarks.memory_estimate --arch sdxl
    python -m benchmarks.memory_estimate --arch sdxl --saved-activations
    python -m benchmarks.memory_estimate --arch flux1-dev      # flow models: benchmarks/flow_memory.py's table

The models are built on PyTorch's meta device (shapes, no storage), frozen and given the paper's LoRA (rank 32) as
`train.prepare_state` does, then `memory.estimate_training_memory` is asked for each preset row: bf16, batch 1, at
each resolution, with and without `train.low_memory`. `--saved-activations` also counts the bytes autograd saves for
backward in one UNet pass (saved-tensor hooks, bf16, batch 1; views count in full, and meta attention saves its
probabilities, so the count is high for every model alike): a cross-check of how the activation term scales between
architectures, not a peak.

The flow-matching architectures (`flux1-dev`, `sd35-medium`, `sd35-large`) are estimated by benchmarks/flow_memory.py
(measured activations per transformer block, the PALP passes of a rectified-flow step, 8-bit weights, text encoders
off the GPU, tokens in T5); `--arch` with one of them prints its table (`--rank` and `--saved-activations` are SD's).
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks import archs, flow_memory
from benchmarks._cli import run_main
from palpcompose import memory, models

RESOLUTIONS = {"sd15": (512, 768), "sdxl": (768, 1024)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory_estimate", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=tuple(RESOLUTIONS) + archs.FLOW_ARCHS, default="sdxl")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--saved-activations", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p.parse_args(argv)


def meta_models(spec: archs.ArchSpec, rank: int):
    """UNet (bf16), VAE (bf16), text encoder(s) (fp32, as training keeps them) and the LoRA parameters, on meta."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from palpcompose.conditioning import SDXLTextEncoders

    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=spec.default_resolution // spec.vae_scale_factor, **spec.unet)
        vae = AutoencoderKL(**spec.vae)
        text_encoder = CLIPTextModel(CLIPTextConfig(**spec.text))
        if spec.text_2 is not None:
            text_encoder = SDXLTextEncoders(text_encoder, CLIPTextModelWithProjection(CLIPTextConfig(**spec.text_2)))
    models.freeze(unet, vae, text_encoder)
    lora = models.add_lora(unet, rank, rank)
    for module in (unet, vae):
        for p in module.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    return unet, vae, text_encoder, lora


def saved_activation_gib(spec: archs.ArchSpec, unet, resolution: int) -> float:
    side = resolution // spec.vae_scale_factor
    meta = {"device": "meta", "dtype": torch.bfloat16}
    latents = torch.randn(1, 4, side, side, requires_grad=True, **meta)
    embeds = torch.randn(1, 77, unet.config.cross_attention_dim, requires_grad=True, **meta)
    kwargs = {}
    if spec.text_2 is not None:
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, spec.text_2["projection_dim"], **meta),
                                       "time_ids": torch.zeros(1, 6, **meta)}
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", enabled=False):
        unet(latents, torch.tensor([500], device="meta"), embeds, **kwargs)
    return total / 2**30


def run(args: argparse.Namespace) -> dict:
    if args.arch in archs.FLOW_ARCHS:
        report = flow_memory.run_arch(args.arch)
        flow_memory.print_table(report)
        return report
    spec = archs.arch_spec(args.arch)
    unet, vae, text_encoder, lora = meta_models(spec, args.rank)
    params = sum(p.numel() for p in unet.parameters() if not p.requires_grad)
    text_params = sum(p.numel() for p in text_encoder.parameters())
    rows = []
    print(f"{args.arch}: UNet {params / 1e9:.2f} B, text encoder(s) {text_params / 1e9:.2f} B (fp32), "
          f"LoRA rank {args.rank}: {sum(p.numel() for p in lora) / 1e6:.1f} M values")
    for resolution in RESOLUTIONS[args.arch]:
        for low_memory in (False, True):
            e = memory.estimate_training_memory(unet, vae, text_encoder, lora, resolution=resolution, batch_size=1,
                                                half_precision=True, gradient_checkpointing=low_memory,
                                                vae_on_device=not low_memory)
            rows.append({"resolution": resolution, "low_memory": low_memory, "total_gib": round(e.total_gib, 2),
                         "weights_gib": round(e.weights_gib, 2), "trainable_gib": round(e.trainable_gib, 2),
                         "activations_gib": round(e.activations_gib, 2)})
            print(f"  {resolution:5d} px  low_memory={str(low_memory).lower():5s}  ~{e.total_gib:5.1f} GiB "
                  f"(weights {e.weights_gib:.2f}, trained+AdamW {e.trainable_gib:.2f}, activations "
                  f"~{e.activations_gib:.2f})", flush=True)
    report = {"arch": args.arch, "rank": args.rank, "rows": rows}
    if args.saved_activations:
        reference = archs.arch_spec("sd15")
        ref_unet = meta_models(reference, args.rank)[0]
        base = saved_activation_gib(reference, ref_unet, 512)
        report["saved_for_backward_gib"] = {"sd15@512": round(base, 3)}
        for resolution in RESOLUTIONS[args.arch]:
            gib = saved_activation_gib(spec, unet, resolution)
            report["saved_for_backward_gib"][f"{args.arch}@{resolution}"] = round(gib, 3)
            print(f"  saved for backward, {args.arch} at {resolution} px: {gib:.2f} GiB counted, "
                  f"{gib / base:.2f}x SD-1.5 at 512 px ({base:.2f} GiB counted)", flush=True)
    return report


def main(argv=None) -> int:
    return run_main(run, parse_args(argv), ())


if __name__ == "__main__":
    sys.exit(main())
