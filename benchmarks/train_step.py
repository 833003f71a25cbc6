"""Time one training step: the peer's plain DreamBooth-LoRA step against ours, without and with PALP guidance.

    python -m benchmarks.train_step --arch tiny --device cpu --steps 20
    python -m benchmarks.train_step --arch sd15 --device cuda --steps 30 --json \
        --variants reference,none,palp,palp+graphs,palp+fused
    python -m benchmarks.train_step --arch sdxl --device cuda --steps 10 --variants reference,palp,palp+lowmem
    python -m benchmarks.train_step --arch sdxl --device cpu --resolution 64 --steps 1 --warmup 1 --variants palp

Every variant runs in this one process on the same random-weight models. Per variant: the warm-up steps (first
call, CUDA-graph capture, compilation, cuDNN autotuning) are timed and reported separately; then `--steps` steps
are timed one by one (synchronised) and the median is the figure. On CUDA, a short profiled run gives the GPU-busy
time (the sum of device kernel time per step). Peak memory is CUDA's peak allocation during the variant (on CPU:
the process's peak resident set, shared by all variants).

Variant names: `reference` | `none` | `palp` | `sds`, optionally followed by accel levers joined with "+":
`graphs` (the guidance's no-grad passes), `graphs_pers` (the personalization pass, forward and backward), `fused`,
`channels_last`, `compile`, `sdpa=flash|efficient|cudnn|math` (e.g. `palp+graphs+fused`), and
`lowmem`, the low-memory preset (`train.low_memory`: gradient checkpointing, VAE moved to the CPU after caching),
and `dora`, the DoRA adapter (`train.adapter = "dora"`): `--variants palp,palp+dora` times both in one process, and
the report's `dora_vs_lora` gives each DoRA variant's median (and CPU time) over the same variant's with LoRA.
Every variant builds fresh, identically seeded models (the engine adds its token and LoRA to them).
With --json the last stdout line is one JSON object (reference_ms, none_ms, palp_ms, peak_mem_gib, device, ...).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import accel, archs
from benchmarks._cli import run_main
from benchmarks.ours import make_engine_step
from benchmarks.reference import ReferenceStep
from palpcompose.errors import UserError

RUN_STEPS = 500  # the paper's step count: the total-time figure users feel


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=archs.ARCHS, default="tiny")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant (after warm-up)")
    p.add_argument("--warmup", type=int, default=3, help="untimed-in-median warm-up steps per variant")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--subjects", type=int, default=1,
                   help="subjects in the project (ours; each sample draws one, so the step's work should not grow)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the arch's)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--variants", default="reference,none,palp")
    p.add_argument("--alpha", type=float, default=7.5)
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--profile-steps", type=int, default=5, help="steps in the profiled run (CUDA GPU-busy time)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p.parse_args(argv)


@dataclass(frozen=True)
class Variant:
    mode: str  # reference | none | palp | sds
    opts: accel.AccelOptions
    low_memory: bool = False  # train.low_memory: gradient checkpointing, VAE on the CPU after caching
    adapter: str = "lora"  # train.adapter


def parse_variant(name: str) -> Variant:
    """"palp+graphs+sdpa=flash" -> Variant("palp", AccelOptions(cuda_graphs=True, sdpa_backend="flash"))."""
    mode, *levers = name.split("+")
    if mode not in ("reference", "none", "palp", "sds"):
        raise UserError(f"variant {name!r}: must start with reference, none, palp or sds")
    if mode == "reference" and levers:
        raise UserError(f"variant {name!r}: the reference step is the plain peer step; it takes no levers")
    flags = {"graphs": "cuda_graphs", "graphs_pers": "graph_personalization", "fused": "fused_adamw",
             "channels_last": "channels_last", "compile": "compile_blocks"}
    kwargs: dict = {}
    for lever in levers:
        if lever.startswith("sdpa="):
            kwargs["sdpa_backend"] = lever.removeprefix("sdpa=")
        elif lever in flags:
            kwargs[flags[lever]] = True
        elif lever not in ("lowmem", "dora"):
            raise UserError(f"variant {name!r}: unknown lever {lever!r}; levers: {', '.join(flags)}, lowmem, dora, "
                            "sdpa=BACKEND")
    try:
        return Variant(mode, accel.AccelOptions(**kwargs), low_memory="lowmem" in levers,
                       adapter="dora" if "dora" in levers else "lora")
    except ValueError as exc:
        raise UserError(f"variant {name!r}: {exc}") from exc


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_busy_ms(step, steps: int, device: torch.device) -> float:
    """Sum of device kernel (and memcpy/memset) time per step, from torch.profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    # Device-side events only: CPU ops also carry the time of the kernels they launched, which would count twice.
    total_us = sum(evt.self_device_time_total for evt in prof.key_averages() if evt.device_type == DeviceType.CUDA)
    return total_us / 1000 / steps


def time_variant(make_step, steps: int, warmup: int, device: torch.device, profile_steps: int, batch: int) -> dict:
    t0 = time.perf_counter()
    step = make_step()  # caches (latents, frozen prompts), optimizer; CUDA graphs are captured in the first step
    _sync(device)
    setup_s = time.perf_counter() - t0
    if device.type == "cuda":
        # Peak memory of training itself: the setup's fp32 -> bf16 casts of freshly built models would add a
        # transient copy that `palpcompose train` never has (it casts on the way from the CPU).
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    warmup_ms, step_ms, cpu_ms = [], [], []
    for i in range(warmup + steps):
        t, c = time.perf_counter(), time.process_time()
        step()
        _sync(device)
        (warmup_ms if i < warmup else step_ms).append((time.perf_counter() - t) * 1000)
        if i >= warmup:
            cpu_ms.append((time.process_time() - c) * 1000)
    median = statistics.median(step_ms)
    result = {
        "setup_s": round(setup_s, 3),
        "warmup_ms": [round(x, 2) for x in warmup_ms],
        "median_ms": round(median, 3),
        "p10_ms": round(_quantile(step_ms, 0.1), 3),
        "p90_ms": round(_quantile(step_ms, 0.9), 3),
        "steps_timed": steps,
        # CPU time of this process per step (all threads): on a shared machine it does not count time spent waiting
        # for other processes, so it is the steadier figure there; wall time is what a user waits.
        "cpu_time_median_ms": round(statistics.median(cpu_ms), 3),
        "samples_per_s": round(batch * 1000 / median, 3),
        # Extrapolated, not measured: setup + measured warm-up + the remaining steps at the median step time.
        "total_500_steps_s_extrapolated": round(
            setup_s + sum(warmup_ms) / 1000 + (RUN_STEPS - warmup) * median / 1000, 2),
    }
    if device.type == "cuda":
        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 3)
        if profile_steps > 0:
            busy = gpu_busy_ms(step, profile_steps, device)
            result["gpu_busy_ms"] = round(busy, 3)
            result["busy_fraction"] = round(busy / median, 3)
    del step
    return result


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu")
    spec = archs.arch_spec(args.arch)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    resolution = args.resolution or spec.default_resolution
    if resolution % (spec.vae_scale_factor * 8):
        raise UserError(f"--resolution {resolution}: must be a multiple of {spec.vae_scale_factor * 8} "
                        f"for --arch {args.arch}")
    if args.subjects < 1 or args.batch < 1:
        raise UserError("--subjects and --batch must be at least 1")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    parsed = {v: parse_variant(v) for v in variants}

    g = torch.Generator().manual_seed(0)
    pixel_values = (torch.rand(args.batch, 3, resolution, resolution, generator=g) * 2 - 1).to(device)
    input_ids = archs.random_prompt_ids(spec, args.batch, seed=1, device=device)
    tokenizer_dir = Path(tempfile.mkdtemp(prefix="palp-bench-tok-"))

    results: dict[str, dict] = {}
    build_s = []
    for name in variants:
        variant = parsed[name]
        # Every variant gets fresh, identically seeded models: the engine adds its own token and LoRA to them.
        t0 = time.perf_counter()
        m = archs.build(spec, device)
        _sync(device)
        build_s.append(time.perf_counter() - t0)
        if variant.mode == "reference":
            def make_step(m=m):
                ref = ReferenceStep(m, dtype)
                return lambda: ref(pixel_values, input_ids)
        else:
            def make_step(m=m, variant=variant):
                tokenizer = archs.make_tokenizer(spec, tokenizer_dir)
                tokenizer_2 = archs.make_tokenizer(spec, tokenizer_dir / "2") if spec.text_2 else None
                mixed_precision = "no" if dtype == torch.float32 else dtype_name
                return make_engine_step(m, tokenizer, variant.mode, variant.opts, pixel_values, alpha=args.alpha,
                                        beta=args.beta, mixed_precision=mixed_precision,
                                        low_memory=variant.low_memory, num_subjects=args.subjects,
                                        tokenizer_2=tokenizer_2, adapter=variant.adapter)[1]
        try:
            results[name] = time_variant(make_step, args.steps, args.warmup, device, args.profile_steps, args.batch)
        except Exception as exc:  # noqa: BLE001 (one failing lever, e.g. a capture error, must not lose the rest)
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"{name:32s} FAILED: {results[name]['error']}", flush=True)
        else:
            _print_row(name, results[name])
        del m, make_step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    shutil.rmtree(tokenizer_dir, ignore_errors=True)

    report = {
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({torch.get_num_threads()} threads)"),
        "arch": args.arch, "dtype": dtype_name, "resolution": resolution, "batch": args.batch,
        "subjects": args.subjects, "alpha": args.alpha, "beta": args.beta, "torch": torch.__version__,
        "build_s_median": round(statistics.median(build_s), 2),
        "variants": results,
    }
    timed = {n: r for n, r in results.items() if "median_ms" in r}
    for mode in ("reference", "none", "palp"):
        if mode in timed:
            report[f"{mode}_ms"] = results[mode]["median_ms"]
            for key, out in (("gpu_busy_ms", "busy_ms"), ("peak_mem_gib", "peak_mem_gib")):
                if key in results[mode]:
                    report[f"{mode}_{out}"] = results[mode][key]
    # DoRA's cost: each `...+dora` variant over the same variant with LoRA, both timed in this process
    lora_of = {n: "+".join(p for p in n.split("+") if p != "dora") for n in timed if "dora" in n.split("+")[1:]}
    report["dora_vs_lora"] = {n: {"median": round(timed[n]["median_ms"] / timed[lora]["median_ms"], 3),
                                  "cpu_time": round(timed[n]["cpu_time_median_ms"]
                                                    / timed[lora]["cpu_time_median_ms"], 3)}
                              for n, lora in lora_of.items() if lora in timed}
    if "reference" in timed:
        ref = timed["reference"]["median_ms"]
        report["ratios_vs_reference"] = {n: round(r["median_ms"] / ref, 3) for n, r in timed.items()}
    if device.type == "cuda":
        report["peak_mem_gib"] = max((r["peak_mem_gib"] for r in timed.values()), default=None)
    else:
        report["peak_mem_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
        report["peak_mem_note"] = "CPU: peak resident set of the whole process (all variants, Python included)"
    return report


def _print_row(name: str, r: dict) -> None:
    busy = f"  busy {r['gpu_busy_ms']:.1f} ms" if "gpu_busy_ms" in r else ""
    mem = f"  peak {r['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in r else ""
    warm = ", ".join(f"{x:.0f}" for x in r["warmup_ms"])
    print(
        f"{name:32s} median {r['median_ms']:9.2f} ms (p10 {r['p10_ms']:.1f}, p90 {r['p90_ms']:.1f}, "
        f"cpu {r['cpu_time_median_ms']:.1f}){busy}{mem}  "
        f"warm-up [{warm}] ms  500 steps ~{r['total_500_steps_s_extrapolated']:.0f} s (extrapolated)",
        flush=True,
    )


def main(argv=None) -> int:
    return run_main(run, parse_args(argv), ("reference_ms", "none_ms", "palp_ms", "peak_mem_gib"))


if __name__ == "__main__":
    sys.exit(main())
