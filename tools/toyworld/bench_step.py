"""Time one base-model training step on the CPU, by part, fp32 against bf16 autocast, in one process.

    python -m tools.toyworld.bench_step [--batch 64] [--threads 2] [--repeats 5] [--tokens 24 32 77]

Parts: rendering the world, the VAE encoder, and the text encoder + UNet forward and backward (the step itself).
bf16 autocast is also checked for harm: the loss of the same batch under both, and the relative error of the UNet's
output. Timings are for reading, never for asserting.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from palpcompose.models import load_pipeline, resolve_base_model
from palpcompose.toyworld import world


def _time(fn, repeats):
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tokens", type=int, nargs="+", default=[24, 32, 77])
    p.add_argument("--model", default="builtin:toy")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(resolve_base_model(args.model), torch_dtype=torch.float32)
    unet, te, vae, tok = pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer
    g = torch.Generator().manual_seed(0)
    s = world.sample_scenes(args.batch, g)
    out = {"batch": args.batch, "threads": args.threads}
    out["render_s"] = _time(lambda: world.render(s, g), args.repeats)
    images = world.render(s, g)
    with torch.no_grad():
        out["vae_encode_s"] = _time(lambda: vae.encode(images * 2 - 1).latent_dist.mean, args.repeats)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out["vae_encode_bf16_s"] = _time(lambda: vae.encode(images * 2 - 1).latent_dist.mean, args.repeats)
        z = vae.encode(images * 2 - 1).latent_dist.mean * vae.config.scaling_factor
    prompts = world.prompts_for(s)
    unet.train().requires_grad_(True)
    te.train().requires_grad_(True)
    t = torch.randint(0, 1000, (args.batch,), generator=g)
    noisy = z + torch.randn(z.shape, generator=g)
    target = torch.randn(z.shape, generator=g)
    for n_tok in args.tokens:
        ids = tok(prompts, padding="max_length", max_length=n_tok, truncation=True, return_tensors="pt").input_ids
        pos = torch.arange(n_tok)[None]

        def step(bf16, ids=ids, pos=pos):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                cond = te(ids, position_ids=pos)[0]
                pred = unet(noisy, t, cond).sample
            loss = F.mse_loss(pred.float(), target)
            loss.backward()
            unet.zero_grad(set_to_none=True)
            te.zero_grad(set_to_none=True)
            return loss.item(), pred.detach().float()

        fp32 = _time(lambda: step(False), args.repeats)
        bf16 = _time(lambda: step(True), args.repeats)
        (l32, p32), (l16, p16) = step(False), step(True)
        out[f"step_{n_tok}tok"] = {"fp32_s": round(fp32, 3), "bf16_s": round(bf16, 3),
                                   "bf16_speedup": round(fp32 / bf16, 2), "loss_fp32": round(l32, 5),
                                   "loss_bf16": round(l16, 5),
                                   "pred_rel_err": round(float((p16 - p32).norm() / p32.norm()), 4)}
    out = {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
