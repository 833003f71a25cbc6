"""Time rendering: a plain diffusers pipeline call against our render path, on the same random-weight model.

    python -m benchmarks.render --arch tiny --device cpu --batches 3
    python -m benchmarks.render --arch sd15 --device cuda --batch 4 --json \
        --variants diffusers,ours,ours+fuse,ours+graphs,ours+fuse+graphs

Both use the same pipeline object, scheduler (DPM++ 2M, as `palpcompose render` defaults to), number of steps,
CFG scale, batch and resolution, with a rank-32 LoRA attached through peft (as palpcompose.render does):
- `diffusers`: `pipe(prompt=[...] * B, num_inference_steps=S, guidance_scale=7.5, generator=...)`, the peer's call;
- `ours`: palpcompose.render.generate (one CPU generator per seed, inference mode);
- levers for `ours`, joined with "+": `fuse` (merge the LoRA into the base weights for the render, unmerged after),
  `graphs` (accel.GraphedInference: the UNet forward replayed from a CUDA graph), `channels_last`.
Per variant: one warm-up batch (timed, reported apart), then `--batches` timed batches; images/s from the median.
With --json the last stdout line is one JSON object (diffusers_images_per_s, ours_images_per_s, ratios, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import accel, archs
from benchmarks._cli import run_main
from palpcompose.errors import UserError

PROMPT = "An oil painting of a cat sitting on a rock"
LEVERS = ("fuse", "graphs", "channels_last")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.render", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=archs.ARCHS, default="tiny")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch", type=int, default=1, help="images per pipeline call")
    p.add_argument("--batches", type=int, default=3, help="timed pipeline calls per variant (after one warm-up)")
    p.add_argument("--steps", type=int, default=30, help="sampling steps")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="default: fp16 on cuda (as render)")
    p.add_argument("--variants", default="diffusers,ours")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def parse_variant(name: str) -> tuple[str, set[str]]:
    kind, *levers = name.split("+")
    if kind not in ("diffusers", "ours"):
        raise UserError(f"variant {name!r}: must start with diffusers or ours")
    if kind == "diffusers" and levers:
        raise UserError(f"variant {name!r}: the plain diffusers call takes no levers")
    unknown = [lever for lever in levers if lever not in LEVERS]
    if unknown:
        raise UserError(f"variant {name!r}: unknown lever {unknown[0]!r}; levers: {', '.join(LEVERS)}")
    return kind, set(levers)


def build_pipeline(spec: archs.ArchSpec, device: str, dtype: torch.dtype, tokenizer_dir: Path):
    """A StableDiffusionPipeline on random weights with a random rank-32 LoRA attached (peft), DPM++ 2M."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    from palpcompose.render import make_scheduler

    m = archs.build(spec, device)
    tokenizer = archs.make_tokenizer(spec, tokenizer_dir)
    torch.manual_seed(0)
    m.unet.add_adapter(LoraConfig(r=32, lora_alpha=32, target_modules=archs.LORA_TARGETS), adapter_name="palp")
    with torch.no_grad():  # a trained LoRA is not zero: give B random values so the adapter changes the images
        for name, p in m.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    pipe = StableDiffusionPipeline(
        unet=m.unet, vae=m.vae, text_encoder=m.text_encoder, tokenizer=tokenizer,
        scheduler=make_scheduler("dpm++", m.scheduler.config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def levers_applied(pipe, levers: set[str]):
    """Apply render levers for one variant and undo them afterwards, so variants do not leak into each other."""
    from palpcompose.attach import merged_lora

    with contextlib.ExitStack() as undo:  # undone in reverse order
        if "fuse" in levers:
            undo.enter_context(merged_lora(pipe.unet))  # as `palpcompose render` does
        if "channels_last" in levers:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
            undo.callback(pipe.vae.to, memory_format=torch.contiguous_format)
            undo.callback(pipe.unet.to, memory_format=torch.contiguous_format)
        if "graphs" in levers:
            undo.callback(accel.GraphedInference(pipe.unet).remove)
        yield


def run(args: argparse.Namespace) -> dict:
    from palpcompose.render import RenderSettings, generate

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu")
    spec = archs.arch_spec(args.arch)
    dtype_name = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    resolution = args.resolution or spec.default_resolution
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    parsed = {v: parse_variant(v) for v in variants}
    device = torch.device(args.device)
    tokenizer_dir = Path(tempfile.mkdtemp(prefix="palp-bench-tok-"))
    try:
        pipe = build_pipeline(spec, args.device, dtype, tokenizer_dir)
    finally:
        shutil.rmtree(tokenizer_dir, ignore_errors=True)
    settings = RenderSettings(steps=args.steps, guidance_scale=7.5, width=resolution, height=resolution,
                              negative_prompt="", scheduler="dpm++", batch_size=args.batch)
    prompts = [PROMPT] * args.batch

    def plain_call():
        return pipe(prompt=prompts, num_inference_steps=args.steps, guidance_scale=7.5, height=resolution,
                    width=resolution, generator=torch.Generator(device).manual_seed(0)).images

    def our_call():
        return generate(pipe, prompts, list(range(args.batch)), settings)

    results = {}
    for name in variants:
        kind, levers = parsed[name]
        call = plain_call if kind == "diffusers" else our_call
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            with levers_applied(pipe, levers):
                times = []
                for _ in range(1 + args.batches):
                    t = time.perf_counter()
                    call()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    times.append(time.perf_counter() - t)
        except Exception as exc:  # noqa: BLE001 (one failing lever, e.g. a capture error, must not lose the rest)
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"{name:28s} FAILED: {results[name]['error']}", flush=True)
            continue
        median = statistics.median(times[1:])
        results[name] = {
            "warmup_s": round(times[0], 3), "median_batch_s": round(median, 4),
            "images_per_s": round(args.batch / median, 3), "ms_per_image": round(median * 1000 / args.batch, 1),
        }
        if device.type == "cuda":
            results[name]["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        result = results[name]
        print(f"{name:28s} {result['images_per_s']:8.3f} images/s  ({result['ms_per_image']:.0f} ms/image,"
              f" warm-up {times[0]:.2f} s)", flush=True)

    report = {
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({torch.get_num_threads()} threads)"),
        "arch": args.arch, "dtype": dtype_name, "resolution": resolution, "batch": args.batch, "steps": args.steps,
        "scheduler": "dpm++", "torch": torch.__version__, "variants": results,
    }
    for kind in ("diffusers", "ours"):
        if "images_per_s" in results.get(kind, {}):
            report[f"{kind}_images_per_s"] = results[kind]["images_per_s"]
    base = results.get("diffusers", {}).get("images_per_s")
    if base:
        report["speedup_vs_diffusers"] = {n: round(r["images_per_s"] / base, 3) for n, r in results.items()
                                          if "images_per_s" in r}
    return report


def main(argv=None) -> int:
    return run_main(run, parse_args(argv), ())


if __name__ == "__main__":
    sys.exit(main())
