"""How much each word of a prompt is worth to the denoiser, per timestep (docs/toyworld.md, "Why the pattern head
stays flat").

    python -m tools.toyworld loss-gap [--model builtin:toy|CKPT_DIR] [--world v2b] [--scenes 256] [--json FILE]
                                      [--positions N]

For patterned world scenes (their VAE latents, posterior mean), the same noise and timestep, the v-prediction loss
of the model given the scene's true prompt is compared with the loss given the same prompt with one attribute word
replaced by another value of it (the class, the colour, the pattern, the second colour), and with the empty prompt.
The gap L(changed) - L(true), per timestep band of 100, says where in the denoising chain a word steers the sample
and how strongly: a word the model ignores has a gap near 0, and a gap that is small next to the loss itself is
a small gradient for training to learn that word from. `--positions N` lets the UNet read only the first N text
positions (the words and fewer padding states), which asks whether the padding dilutes a word. Forward passes only;
a few minutes on one CPU thread.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from palpcompose.errors import UserError
from palpcompose.toyworld import world
from palpcompose.toyworld.worlds import WORLDS

ATTRIBUTES = ("cls", "color", "pattern", "color2")
BANDS = 10


def _swapped(s: world.Scenes, attr: str, g: torch.Generator) -> world.Scenes:
    """The same scenes with `attr` moved to another allowed value (the picture is unchanged)."""
    v = getattr(s, attr)
    if attr == "pattern":  # another pattern, never solid
        new = 1 + (v - 1 + torch.randint(1, len(world.PATTERNS) - 1, v.shape, generator=g)) % (len(world.PATTERNS) - 1)
    elif attr == "color2":  # white <-> black in the worlds with two second colours; any other colour in v1
        new = (v + torch.randint(1, len(world.COLORS2), v.shape, generator=g)) % len(world.COLORS2)
        pair = torch.tensor([world.COLORS2.index("white"), world.COLORS2.index("black")])
        flipped = torch.where(v == pair[0], pair[1], pair[0])
        new = torch.where((v == pair[0]) | (v == pair[1]), flipped, new)
    else:
        n = len(world.CLASSES) if attr == "cls" else len(world.COLORS)
        new = (v + torch.randint(1, n, v.shape, generator=g)) % n
    return dataclasses.replace(s, **{attr: new})


@torch.no_grad()
def loss_gap(pipe, world_name: str = "v2b", scenes: int = 256, seed: int = 0, batch: int = 128,
             positions: int | None = None) -> dict:
    """`positions`: the UNet reads only the first this many text positions (fewer padding states; None: all)."""
    from diffusers import DDPMScheduler

    from tools.toyworld.train_base import noise_schedule_config

    w = WORLDS[world_name]
    g = torch.Generator().manual_seed(seed)
    s = w.scenes(scenes * 2, g, solid_fraction=0.0)
    keep = s.pattern > 0  # held-out combinations were turned solid
    s = world.Scenes(**{f: getattr(s, f)[keep][:scenes] for f in s.__dataclass_fields__})
    images = world.render(s, g)
    latents = torch.cat([pipe.vae.encode(images[k:k + batch] * 2 - 1).latent_dist.mean
                         for k in range(0, len(images), batch)]) * pipe.vae.config.scaling_factor
    prompts = {"true": world.prompts_for(s), "empty": [""] * len(s.cls)}
    for attr in ATTRIBUTES:
        prompts[attr] = world.prompts_for(_swapped(s, attr, g))
    sched = DDPMScheduler(**noise_schedule_config(pipe.scheduler.config.prediction_type))
    alphas = sched.alphas_cumprod
    T = sched.config.num_train_timesteps
    tok = pipe.tokenizer
    longest = max(len(tok(p).input_ids) for texts in prompts.values() for p in texts)  # start and end tokens included
    if positions is not None and positions < longest:
        raise UserError(f"--positions {positions}: these prompts need {longest} (every word and the end token)")

    def cond(texts):
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return pipe.text_encoder(ids)[0][:, :positions]

    out = {"world": world_name, "scenes": len(s.cls), "positions": positions or tok.model_max_length, "bands": []}
    for b in range(BANDS):
        lo, hi = b * T // BANDS, (b + 1) * T // BANDS
        t = torch.randint(lo, hi, (len(s.cls),), generator=g)
        noise = torch.randn(latents.shape, generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * latents
        losses = {}
        for name, texts in prompts.items():
            per = []
            for k in range(0, len(texts), batch):
                pred = pipe.unet(noisy[k:k + batch], t[k:k + batch], cond(texts[k:k + batch])).sample
                per.append(((pred - target[k:k + batch]) ** 2).mean(dim=(1, 2, 3)))
            losses[name] = torch.cat(per)
        row = {"t": [lo, hi - 1], "loss_true": round(float(losses["true"].mean()), 5)}
        for name in ("empty", *ATTRIBUTES):
            gap = losses[name] - losses["true"]
            row[f"gap_{name}"] = round(float(gap.mean()), 5)
            row[f"gap_{name}_se"] = round(float(gap.std() / len(gap) ** 0.5), 5)
        out["bands"].append(row)
    return out


def print_table(report: dict) -> None:
    cols = ("empty", *ATTRIBUTES)
    print(f"loss gap L(word changed) - L(true prompt), v-prediction, {report['scenes']} patterned "
          f"{report['world']} scenes, the first {report['positions']} text positions")
    print(f"{'t':>9} {'L(true)':>8} " + " ".join(f"{c:>15}" for c in cols))
    for r in report["bands"]:
        cells = " ".join(f"{r[f'gap_{c}']:>8.5f}±{r[f'gap_{c}_se']:.4f}" for c in cols)
        print(f"{r['t'][0]:>4}-{r['t'][1]:<4} {r['loss_true']:>8.4f} {cells}")


def main(model: str, world_name: str, scenes: int, json_path: Path | None, threads: int,
         positions: int | None = None) -> None:
    torch.set_num_threads(threads)
    from tools.toyworld.probe import load_toy_pipeline

    if model == "builtin:toy":
        pipe = load_toy_pipeline()
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32, safety_checker=None)
    if positions is not None and not 1 <= positions <= pipe.tokenizer.model_max_length:
        raise UserError(f"--positions {positions}: at most the model's {pipe.tokenizer.model_max_length}")
    report = loss_gap(pipe, world_name, scenes, positions=positions)
    report["model"] = model
    print_table(report)
    if json_path:
        from palpcompose.fsutil import atomic_write_text

        atomic_write_text(json_path, json.dumps(report, indent=1))
