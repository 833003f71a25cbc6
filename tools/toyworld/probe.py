"""The capacity probe (docs/toyworld.md, "The capacity probe"): can the shipped architecture draw one subject's
pattern when it is fine-tuned on that subject alone?

    python -m tools.toyworld probe --out DIR [--subjects 4] [--steps 300] [--batch 16] [--threads 2]
                                   [--world v2|v2b] [--oracle READOUT_DIR]

For each probe subject (seeds 3,000,000 + i, v2 world: white or black second colours), starting from builtin:toy:
fine-tune the whole UNet (text encoder and VAE frozen) on fresh photo/day world renders of the subject, prompt = the
subject described in words, v-prediction loss on the shipped noise schedule; then render the prompt and read the
renders with the shipped oracle. The bound is the oracle on the VAE's reconstructions of the subject's renders.
Writes DIR/probe.json (per subject and the mean per head: before, after, bound) and DIR/probe.png.
`--world v2b` draws the subjects (references, fine-tuning data) at v2b's larger object scale; `--oracle` reads with a
read-out's oracle (one tuned to read that world) instead of the shipped one.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from palpcompose.fsutil import atomic_save_image, atomic_save_safetensors, atomic_write_text
from palpcompose.models import resolve_base_model
from palpcompose.toyworld import ceiling, world
from palpcompose.toyworld import oracle as oracle_mod
from palpcompose.toyworld.worlds import WORLDS, World
from tools.toyworld.checkpoint import load_sharded

HEADS = oracle_mod.IDENTITY_HEADS
FIRST_SEED = 3_000_000


def described_prompt(subject: world.Subject) -> str:
    return ceiling.subject_prompts(subject, "photo", "day")[0]  # the gate's own wording (with "an orange ...")


def load_toy_pipeline():
    from diffusers import StableDiffusionPipeline

    source = resolve_base_model("builtin:toy")
    pipe = StableDiffusionPipeline.from_pretrained(str(source.location), torch_dtype=torch.float32,
                                                   safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


PARTS = ("before", "after", "vae_bound", "clean")  # the images a probe keeps, each read per head


def _head_means(p: torch.Tensor) -> dict:
    return {h: round(float(p[:, j].mean()), 4) for j, h in enumerate(HEADS)}


@torch.no_grad()
def draw_renders(pipe, subject, n: int) -> torch.Tensor:
    return ceiling.render_prompts(pipe, [described_prompt(subject)] * n, seed=0, steps=20, guidance_scale=5.0)


@torch.no_grad()
def world_and_reconstructions(pipe, subject, n: int, w: World) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean world renders of the subject and the VAE's reconstructions of them (posterior mean: the bound)."""
    g = torch.Generator().manual_seed(subject.seed)
    images = world.render(w.subject_scenes(subject, n, g), g)
    rec = ((pipe.vae.decode(pipe.vae.encode(images * 2 - 1).latent_dist.mean).sample + 1) / 2).clamp(0, 1)
    return images, rec


def fine_tune(pipe, subject, steps: int, batch: int, lr: float, log, w: World, siblings: list | None = None) -> None:
    """The whole UNet on the subject's photo/day renders, text encoder and VAE frozen (v-prediction loss).
    `siblings` (the selection probe): subjects trained together, each sample one of them drawn at random, each with
    its own described prompt."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    unet, vae = pipe.unet, pipe.vae
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    group = siblings or [subject]
    ids = pipe.tokenizer([described_prompt(s) for s in group], padding="max_length", truncation=True,
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        conds = pipe.text_encoder(ids)[0]  # (len(group), L, D)
    cond = conds[:1].expand(batch, -1, -1)
    g = torch.Generator().manual_seed(subject.seed + 1)
    start = time.time()
    for step in range(steps):
        with torch.no_grad():
            if siblings is None:
                images = world.render(w.subject_scenes(subject, batch, g), g)
            else:  # a random sibling per sample, rendered sibling by sibling, the prompts in the same order
                which = torch.randint(len(group), (batch,), generator=g).sort().values
                images = torch.cat([world.render(w.subject_scenes(group[k], int((which == k).sum()), g), g)
                                    for k in range(len(group)) if (which == k).any()])
                cond = conds[which]
            latents = vae.encode(images * 2 - 1).latent_dist.sample(generator=g) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
        noisy = sched.add_noise(latents, noise, t)
        target = sched.get_velocity(latents, noise, t)
        loss = F.mse_loss(unet(noisy, t, cond).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log({"seed": subject.seed, "step": step, "loss": round(float(loss), 4),
                 "seconds": round(time.time() - start, 1)})
    unet.eval()


def with_pattern_freq(subject: world.Subject, freq_range: tuple[float, float] | None) -> world.Subject:
    """The subject with its pattern frequency moved from the world's 1.8-2.6 periods per object radius into
    `freq_range`, at the same relative place (None: unchanged). A world with coarser patterns, for the probe."""
    if freq_range is None:
        return subject
    lo, hi = freq_range
    return dataclasses.replace(subject, pattern_freq=lo + (hi - lo) * (subject.pattern_freq - 1.8) / 0.8)


def images_path(out: Path, seed: int) -> Path:
    return out / f"images-{seed}.safetensors"


def probe_subject(out: Path, subject, w: World, steps: int, batch: int, lr: float, n_images: int, log) -> None:
    """Fine-tune a fresh builtin:toy on `subject` and keep every image the reading needs (before, after, the
    world's renders and their reconstructions) in one atomic file: the oracle reads them afterwards, so the
    images can be drawn while the oracle that reads them is still training, and a stopped probe resumes."""
    torch.manual_seed(subject.seed)
    pipe = load_toy_pipeline()
    before = draw_renders(pipe, subject, n_images)
    clean, rec = world_and_reconstructions(pipe, subject, n_images, w)
    fine_tune(pipe, subject, steps, batch, lr, log, w)
    after = draw_renders(pipe, subject, n_images)
    atomic_save_safetensors(images_path(out, subject.seed),
                            {"before": before, "after": after, "clean": clean, "vae_bound": rec})


@torch.no_grad()
def read_probe(out: Path, subjects: list, w: World, oracle, oracle_name: str, meta: dict) -> dict:
    """The oracle's probability of the truth per head on each subject's saved images; probe.json and probe.png."""
    from safetensors.torch import load_file

    rows, strips = [], []
    for subject in subjects:
        images = load_file(str(images_path(out, subject.seed)))
        row = {"seed": subject.seed, "prompt": described_prompt(subject)}
        for part in PARTS:
            row[part] = _head_means(ceiling.identity_probs(oracle, images[part], subject)[0])
        rows.append(row)
        g = torch.Generator().manual_seed(subject.seed)
        refs = world.render(w.subject_scenes(subject, 4, g), g)
        strips.append(torch.cat([refs, images["before"][:4], images["after"][:4]]))
    # rows: subjects; refs | v1 | fine-tuned
    return _write_report(out, "probe", "The capacity probe", "subjects", rows, strips, meta, w, oracle_name)


def _write_report(out: Path, name: str, design: str, key: str, rows: list, strips: list, meta: dict, w: World,
                  oracle_name: str) -> dict:
    """NAME.json (the rows and their mean per part and head) and NAME.png (one strip of images per row)."""
    summary = {part: {h: round(sum(r[part][h] for r in rows) / len(rows), 4) for h in HEADS} for part in PARTS}
    report = {"design": f"docs/toyworld.md, '{design}'", **meta, "world": w.name, "oracle": oracle_name,
              key: rows, "mean": summary}
    atomic_write_text(out / f"{name}.json", json.dumps(report, indent=2) + "\n")
    grid = torch.cat([torch.cat(list(s), dim=2) for s in strips], dim=1)
    atomic_save_image(out / f"{name}.png", world.to_pil(grid))
    return report


def pattern_siblings(subject: world.Subject) -> list[world.Subject]:
    """The subject with each of the world's patterns (stripes, dots, checks): the same class, colours and pattern
    geometry, so that their described prompts differ in the pattern word only."""
    return [dataclasses.replace(subject, pattern=p) for p in range(1, len(world.PATTERNS))]


def siblings_path(out: Path, seed: int, alone: bool = False) -> Path:
    """The selection probe's images of one subject; the draw-alone control's under their own name, so that a folder
    of one is never read as the other."""
    return out / f"siblings{'-alone' if alone else ''}-{seed}.safetensors"


def probe_siblings(out: Path, subject, w: World, steps: int, batch: int, lr: float, n_images: int, log,
                   alone: bool = False) -> None:
    """The selection probe for one subject: fine-tune a fresh builtin:toy on its three pattern siblings together,
    then keep, per sibling, the renders of its described prompt before and after and the world's renders and their
    reconstructions (one atomic file, read later as in probe_subject). `alone` (the draw-alone control): a fresh
    builtin:toy per sibling, fine-tuned on that sibling only (`steps` each), the same images kept."""
    torch.manual_seed(subject.seed)
    pipe = load_toy_pipeline()
    group = pattern_siblings(subject)
    images = {}
    for sib in group:
        images[f"before-{sib.pattern}"] = draw_renders(pipe, sib, n_images)
        images[f"clean-{sib.pattern}"], images[f"vae_bound-{sib.pattern}"] = world_and_reconstructions(
            pipe, sib, n_images, w)
    if alone:
        for sib in group:
            torch.manual_seed(subject.seed)
            pipe = load_toy_pipeline()
            fine_tune(pipe, sib, steps, batch, lr, log, w)
            images[f"after-{sib.pattern}"] = draw_renders(pipe, sib, n_images)
    else:
        fine_tune(pipe, subject, steps, batch, lr, log, w, siblings=group)
        for sib in group:
            images[f"after-{sib.pattern}"] = draw_renders(pipe, sib, n_images)
    atomic_save_safetensors(siblings_path(out, subject.seed, alone), images)


@torch.no_grad()
def read_siblings(out: Path, subjects: list, w: World, oracle, oracle_name: str, meta: dict,
                  alone: bool = False) -> dict:
    """Per sibling, the oracle's probability of the truth per head; the mean per head over every sibling;
    selection.json and selection.png (rows: siblings; world renders | before | after)."""
    from safetensors.torch import load_file

    rows, strips = [], []
    for subject in subjects:
        images = load_file(str(siblings_path(out, subject.seed, alone)))
        for sib in pattern_siblings(subject):
            row = {"seed": subject.seed, "pattern": world.PATTERNS[sib.pattern], "prompt": described_prompt(sib)}
            for part in PARTS:
                row[part] = _head_means(ceiling.identity_probs(oracle, images[f"{part}-{sib.pattern}"], sib)[0])
            rows.append(row)
            strips.append(torch.cat([images[f"clean-{sib.pattern}"][:4], images[f"before-{sib.pattern}"][:4],
                                     images[f"after-{sib.pattern}"][:4]]))
    return _write_report(out, "selection", "The selection probe", "siblings", rows, strips, meta, w, oracle_name)


def run_probe(out: Path, n_subjects: int = 4, steps: int = 300, batch: int = 16, lr: float = 1e-4,
              n_images: int = 16, pattern_freq: tuple[float, float] | None = None, world_name: str = "v2",
              oracle_dir: Path | None = None, draw_only: bool = False, siblings: bool = False,
              alone: bool = False) -> dict | None:
    """Draw what is missing (subjects whose images file exists are kept), then read it all with the oracle
    (`oracle_dir`: a read-out's; default the shipped one). `draw_only`: stop after drawing. `siblings`: the
    selection probe (each subject's three pattern siblings trained together; selection.json); with `alone`, each
    sibling trained on its own (the draw-alone control)."""
    w = WORLDS[world_name]
    out.mkdir(parents=True, exist_ok=True)

    def log(record):
        print(json.dumps(record), flush=True)

    subjects = [with_pattern_freq(w.subject(FIRST_SEED + i), pattern_freq) for i in range(n_subjects)]
    for subject in subjects:
        path = siblings_path(out, subject.seed, alone) if siblings else images_path(out, subject.seed)
        if not path.is_file():
            if siblings:
                probe_siblings(out, subject, w, steps, batch, lr, n_images, log, alone=alone)
            else:
                probe_subject(out, subject, w, steps, batch, lr, n_images, log)
            log({"seed": subject.seed, "drawn": str(path)})
    if draw_only:
        return None
    oracle = oracle_mod.load_oracle()
    if oracle_dir is not None:
        oracle.load_state_dict(load_sharded(oracle_dir, "oracle"))
        oracle.eval()
    meta = {"steps": steps, "batch": batch, "lr": lr, "pattern_freq": pattern_freq,
            **({"trained": "each sibling alone" if alone else "the siblings together"} if siblings else {})}
    oracle_name = str(oracle_dir) if oracle_dir is not None else "shipped"
    report = (read_siblings(out, subjects, w, oracle, oracle_name, meta, alone) if siblings
              else read_probe(out, subjects, w, oracle, oracle_name, meta))
    for row in report["siblings" if siblings else "subjects"]:
        log(row)
    log({"mean": report["mean"]})
    return report
