"""The read-out: fine-tune the VAE decoder, then the oracle, so that decoded latents read as what they encode
(docs/toyworld.md, "v2 diagnosis" (a)/(b) and "Read-out design decisions").

    python -m tools.toyworld readout --ckpt DIR --out DIR2 [--minutes M] [--threads N] [--resume]

DIR is a train-base checkpoint (read only: its VAE, its oracle, its world). Phase 1 trains the decoding half of the
VAE (`decoder.*`, `post_quant_conv.*`) by L1 against fresh v2-world renders, the latent being a sample of the frozen
encoder's posterior: the encoder stays bit for bit, so the UNet and its cached latents stay valid. Phase 2 trains
the oracle on four equal quarters per batch: clean renders and new-decoder reconstructions of both worlds (v1's
second colours and v2's white/black). Before, after phase 1 and at the end, the same held-out images are measured:
per-head accuracy on clean renders and on reconstructions of each world, and diagnose.py's (b) (fidelity of
reconstructions per style). The clean accuracy per head must not drop (`guard`); a read-out that fails it is
recorded as such and `export-base --readout` refuses it.

Every step's data comes from a generator seeded by (seed, phase, step), and checkpoints hold fp32 weights and AdamW's
moments, so a resumed run is the uninterrupted run. DIR2: state.json, vae-*/oracle-*/optim-* shards, readout.jsonl.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from palpcompose.errors import Interrupted, PalpcomposeError, UserError
from palpcompose.fsutil import atomic_write_json
from palpcompose.toyworld import ceiling, world
from palpcompose.toyworld import oracle as oracle_mod
from palpcompose.toyworld.worlds import WORLDS, World, world_of
from tools.toyworld import diagnose
from tools.toyworld.checkpoint import digest, flat_optim, git_commit, load_sharded, restore_optim, save_sharded
from tools.toyworld.recipes import config_from_state
from tools.toyworld.train_base import build_vae

# held-out clean renders per world; v1's is the set of `python -m palpcompose.toyworld oracle-accuracy`
EVAL_SEEDS = {"v1": 4242, "v2": 4243, "v2b": 4244, "v2c": 4245}
DECODING = ("decoder.", "post_quant_conv.")  # the VAE's decoding half; the rest (encoder, quant_conv) is frozen
PHASE_SEED = {"decoder": 10_000_000, "oracle": 20_000_000}
B_TARGET = 0.95  # (b) per style the design asks of decoder + oracle before a ceiling run is worth it


@dataclass(frozen=True)
class ReadoutConfig:
    seed: int = 0
    world: str = "v2"  # the world the source model draws (a checkpoint's own; builtin:toy needs --world)
    decoder_steps: int = 1000
    decoder_batch: int = 64
    decoder_lr: float = 1e-4
    oracle_steps: int = 1000
    oracle_batch: int = 64  # equal parts: clean and reconstructed renders of each of the oracle's worlds
    oracle_lr: float = 2e-4
    oracle_worlds: tuple[str, ...] = ("v1",)  # trained on besides the source's world (v2b's retry adds v2)
    oracle_weight_decay: float = 1e-4
    warmup_steps: int = 50
    min_lr_frac: float = 0.1
    solid_fraction: float = 0.4
    eval_images: int = 2000  # per world
    eval_subjects: int = 6  # (b): ceiling subjects in the v2 world
    eval_per_cell: int = 2
    guard_tolerance: float = 0.005
    ckpt_every_s: float = 180.0
    log_every_s: float = 60.0


SMOKE = {"decoder_steps": 3, "decoder_batch": 4, "oracle_steps": 3, "oracle_batch": 8, "warmup_steps": 2,
         "eval_images": 16, "eval_subjects": 1, "eval_per_cell": 1, "ckpt_every_s": 0.0, "log_every_s": 0.0}


class GuardFailed(PalpcomposeError):
    """The fine-tuned oracle reads clean renders worse than before on some head: the read-out must not be used."""


def is_decoding(key: str) -> bool:
    return key.startswith(DECODING)


def encoder_part(vae_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in vae_state.items() if not is_decoding(k)}


def step_generator(seed: int, phase: str, step: int) -> torch.Generator:
    """The generator of one training step: depends on (seed, phase, step) only, so a resumed run draws the same."""
    return torch.Generator().manual_seed(seed * 1_000_003 + PHASE_SEED[phase] + step)


def lr_at(step: int, total: int, base: float, cfg: ReadoutConfig) -> float:
    warm = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    frac = min(1.0, step / max(total, 1))
    return base * warm * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


# ----------------------------------------------------------------------------------------------------------------
# Data, losses, measurements
# ----------------------------------------------------------------------------------------------------------------


def render(n: int, g: torch.Generator, w: World, solid_fraction: float):
    s = w.scenes(n, g, styles=world.ALL_STYLES, exclude_held_out_subjects=False, solid_fraction=solid_fraction)
    return s, world.render(s, g)


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, g: torch.Generator, batch: int = 256) -> torch.Tensor:
    """Frozen encoder, a posterior sample, the (new) decoder; images in [0, 1]."""
    out = []
    for i in range(0, len(images), batch):
        z = vae.encode(images[i:i + batch] * 2 - 1).latent_dist.sample(generator=g)
        out.append(((vae.decode(z).sample + 1) / 2).clamp(0, 1))
    return torch.cat(out)


def decoder_loss(vae, cfg: ReadoutConfig, g: torch.Generator) -> torch.Tensor:
    """L1 between the source world's renders and their decoded posterior samples (gradient into the decoding half
    only)."""
    _, images = render(cfg.decoder_batch, g, WORLDS[cfg.world], cfg.solid_fraction)
    x = images * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.sample(generator=g)
    return (vae.decode(z).sample - x).abs().mean()


def oracle_worlds(cfg: ReadoutConfig) -> tuple[str, ...]:
    """The worlds the oracle trains on: cfg.oracle_worlds, then the source's world (each once)."""
    return tuple(dict.fromkeys((*cfg.oracle_worlds, cfg.world)))


def oracle_loss(vae, oracle, cfg: ReadoutConfig, g: torch.Generator) -> torch.Tensor:
    """Cross-entropy over the six heads on equal parts of the batch: clean and reconstructed renders of each of
    the oracle's worlds (by default v1 and the source's: four quarters)."""
    names = oracle_worlds(cfg)
    q = cfg.oracle_batch // (2 * len(names))
    images, targets = [], []
    for name in names:
        s, imgs = render(2 * q, g, WORLDS[name], cfg.solid_fraction)
        images += [imgs[:q], reconstruct(vae, imgs[q:], g)]
        targets.append(oracle_mod.oracle_targets(s))
    logits = oracle(torch.cat(images))
    loss = torch.zeros(())
    for head in logits:
        target = torch.cat([t[head] for t in targets])
        if (target >= 0).any():  # no second colour on an all-solid (tiny) batch
            loss = loss + F.cross_entropy(logits[head], target, ignore_index=-100)
    return loss


def eval_set(name: str, images: int) -> tuple[world.Scenes, torch.Tensor]:
    """A world's held-out clean renders (seeded by EVAL_SEEDS, all five styles)."""
    g = torch.Generator().manual_seed(EVAL_SEEDS[name])
    s = WORLDS[name].scenes(images, g, styles=world.ALL_STYLES, exclude_held_out_subjects=False)
    return s, world.render(s, g)


def eval_sets(cfg: ReadoutConfig) -> dict:
    """The held-out clean renders of each world (the same images before and after)."""
    return {name: eval_set(name, cfg.eval_images)
            for name in sorted({"v1", "v2", cfg.world}, key=list(EVAL_SEEDS).index)}


@torch.no_grad()
def measure(vae, oracle, cfg: ReadoutConfig, sets: dict) -> dict:
    """Per head and style: accuracy on clean renders and on reconstructions of each world; (b) on the v2 world's
    ceiling subjects in the source world (diagnose.legibility: clean, posterior-mean and posterior-sample
    reconstructions)."""
    oracle.eval()
    out = {"clean": {}, "reconstructed": {}}
    for name, (s, images) in sets.items():
        out["clean"][name] = oracle_mod.accuracy_by_style(oracle, images, s)
        rec = reconstruct(vae, images, torch.Generator().manual_seed(cfg.seed * 1_000_003 + 77))
        out["reconstructed"][name] = oracle_mod.accuracy_by_style(oracle, rec, s)
    w = WORLDS[cfg.world]
    subjects = [w.subject(seed) for seed in ceiling.CEILING_SUBJECT_SEEDS[:cfg.eval_subjects]]  # the world's own
    out["b_v2"], _ = diagnose.legibility(SimpleNamespace(vae=vae), oracle, subjects, per_cell=cfg.eval_per_cell,
                                         object_scale=w.object_scale)
    return out


def guard(before: dict, after: dict, tolerance: float) -> dict:
    """Clean accuracy per head and world (all styles) must not drop by more than `tolerance` (paired images)."""
    dropped = []
    for name, heads in before["clean"].items():
        for head, acc in heads.items():
            was, now = acc["all_styles"], after["clean"][name][head]["all_styles"]
            if now < was - tolerance:
                dropped.append({"world": name, "head": head, "before": was, "after": now})
    return {"passed": not dropped, "tolerance": tolerance, "dropped": dropped}


def b_summary(m: dict) -> dict:
    by_style = {s: v["fidelity"] for s, v in m["b_v2"]["vae_mean"].items()}
    return {"need": B_TARGET, "by_style": by_style, "met": all(v >= B_TARGET for v in by_style.values())}


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


class _Stop:
    """SIGTERM/SIGINT during a training step is deferred to the step's end (a checkpoint is then consistent)."""

    def __init__(self):
        self.in_step = False
        self.requested = False

    def __call__(self, *_):
        if self.in_step:
            self.requested = True
        else:
            raise KeyboardInterrupt


def load_source(ckpt: Path | str, world_name: str | None = None):
    """The VAE (fp32, its latent scale) and the oracle of a train-base checkpoint, or of the shipped builtin:toy
    (`ckpt` = "builtin:toy"; its VAE and the shipped oracle), the world they are read on, and what identifies them.
    A checkpoint's world is the one it recorded; builtin:toy needs `world_name`."""
    if str(ckpt) == "builtin:toy":
        if world_name not in WORLDS or world_name == "v1":
            raise UserError(f"--ckpt builtin:toy: name the world to read it on with --world "
                            f"({', '.join(w for w in WORLDS if w != 'v1')})")
        from safetensors.torch import load_file

        from palpcompose.models import BUILTIN_MODELS
        from palpcompose.toyworld.oracle import load_oracle

        toy = BUILTIN_MODELS["builtin:toy"]
        vae_sd = {k: v.float() for k, v in load_file(str(next((toy / "vae").glob("*.safetensors")))).items()}
        oracle_sd = load_oracle().state_dict()
        state = {"scaling_factor": json.loads((toy / "vae" / "config.json").read_text())["scaling_factor"]}
        w = WORLDS[world_name]
    else:
        ckpt = Path(ckpt)
        path = ckpt / "state.json"
        if not path.is_file():
            raise UserError(f"--ckpt {ckpt}: no state.json there; pass the folder train-base wrote (or builtin:toy)")
        state = json.loads(path.read_text())
        saved = config_from_state(state.get("config", {}))
        w = world_of(saved.color2_choices, saved.object_scale, saved.pattern_freq, saved.pattern_angle)
        if w.name == "v1":
            raise UserError(f"--ckpt {ckpt}: its world is v1's (second colours of any colour); the read-out is for "
                            f"the v2 worlds (second colours white and black)")
        if world_name is not None and world_name != w.name:
            raise UserError(f"--world {world_name}: --ckpt {ckpt} was trained on world {w.name}; drop --world")
        vae_sd, oracle_sd = load_sharded(ckpt, "vae"), load_sharded(ckpt, "oracle")
        if vae_sd is None or oracle_sd is None:
            raise UserError(f"--ckpt {ckpt}: no vae-*.safetensors or oracle-*.safetensors there")
    if w.name not in EVAL_SEEDS:
        raise UserError(f"--ckpt {ckpt}: its world ({w}) is none of {', '.join(WORLDS)}; add it to "
                        "palpcompose/toyworld/worlds.py")
    vae = build_vae()
    vae.load_state_dict(vae_sd)
    vae.register_to_config(scaling_factor=state["scaling_factor"])
    oracle = oracle_mod.Oracle()
    oracle.load_state_dict(oracle_sd)
    source = {"ckpt": str(ckpt), "world": w.name, "scaling_factor": state["scaling_factor"],
              "ckpt_unet_steps": state.get("unet_steps"), "ckpt_git_commit": state.get("git_commit"),
              "vae_encoder_digest": digest(encoder_part(vae_sd)), "vae_digest": digest(vae_sd),
              "oracle_digest": digest(oracle_sd)}
    return vae.eval().requires_grad_(False), oracle.eval().requires_grad_(False), source


class Readout:
    def __init__(self, ckpt: Path | str, out: Path, cfg: ReadoutConfig, resume: bool, world_name: str | None):
        self.vae, self.oracle, source = load_source(ckpt, world_name)
        self.out, self.cfg = out, replace(cfg, world=source["world"])
        self.optim_state = None
        if resume:
            self.state = json.loads((out / "state.json").read_text())
            if self.state["source"]["vae_encoder_digest"] != source["vae_encoder_digest"]:
                raise UserError(f"--ckpt {ckpt}: its VAE encoder is not the one {out} started from; resume with the "
                                f"checkpoint it recorded ({self.state['source']['ckpt']})")
            self.vae.load_state_dict(load_sharded(out, "vae"))
            self.oracle.load_state_dict(load_sharded(out, "oracle"))
            self.optim_state = load_sharded(out, "optim")
        else:
            self.state = {"source": source, "config": asdict(self.cfg), "phase": "before", "decoder_step": 0,
                          "oracle_step": 0, "seconds": 0.0, "measurements": {}, "optim_phase": None}
        self.state["git_commit"] = git_commit()
        self.sets = None
        self.stop = _Stop()

    def save(self, optimizer=None) -> None:
        was, self.stop.in_step = self.stop.in_step, True  # a signal now waits for the whole checkpoint
        save_sharded(self.out, "vae", self.vae.state_dict())
        save_sharded(self.out, "oracle", self.oracle.state_dict())
        if optimizer is not None:
            save_sharded(self.out, "optim", flat_optim(optimizer))
            self.state["optim_phase"] = self.state["phase"]
        atomic_write_json(self.out / "state.json", self.state)
        self.stop.in_step = was
        if self.stop.requested and not was:  # signalled while saving outside a step: stop now
            raise KeyboardInterrupt

    def log(self, record: dict) -> None:
        record = {"time": round(time.time(), 1), **record}
        print(json.dumps(record), flush=True)
        with open(self.out / "readout.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def measure(self, name: str) -> None:
        t0 = time.time()
        if self.sets is None:
            self.sets = eval_sets(self.cfg)
        m = measure(self.vae, self.oracle, self.cfg, self.sets)
        self.state["measurements"][name] = m
        self.log({"phase": "measure", "which": name, "seconds": round(time.time() - t0, 1),
                  "clean": {w: {h: a["all_styles"] for h, a in m["clean"][w].items()} for w in m["clean"]},
                  "reconstructed": {w: {h: a["all_styles"] for h, a in m["reconstructed"][w].items()}
                                    for w in m["reconstructed"]},
                  "b_v2_mean": {s: v["fidelity"] for s, v in m["b_v2"]["vae_mean"].items()}})

    def train(self, phase: str, deadline: float, stop_after: int | None) -> bool:
        """Steps of `phase` until its last step, the deadline or `stop_after` steps; True when the phase is done."""
        cfg = self.cfg
        total, base = ((cfg.decoder_steps, cfg.decoder_lr) if phase == "decoder" else (cfg.oracle_steps, cfg.oracle_lr))
        if phase == "decoder":
            named = [(k, p) for k, p in self.vae.named_parameters() if is_decoding(k)]
            opt = torch.optim.AdamW([p for _, p in named], lr=base, weight_decay=0.0)
            params = [p for _, p in named]
        else:
            self.oracle.train()
            params = list(self.oracle.parameters())
            opt = torch.optim.AdamW(params, lr=base, weight_decay=cfg.oracle_weight_decay)
        for p in params:
            p.requires_grad_(True)
        if self.optim_state is not None and self.state.get("optim_phase") == phase:
            restore_optim(opt, self.optim_state)
        self.optimizer = (phase, opt)
        key = f"{phase}_step"
        last_ckpt = last_log = time.time()
        losses, t_start, step_start = [], time.time(), self.state[key]
        while self.state[key] < total:
            if time.time() > deadline or (stop_after is not None and self.steps_run >= stop_after):
                break
            step = self.state[key]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, base, cfg)
            self.stop.in_step = True
            g = step_generator(cfg.seed, phase, step)
            loss = decoder_loss(self.vae, cfg, g) if phase == "decoder" else oracle_loss(self.vae, self.oracle, cfg, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            self.state[key] += 1
            self.steps_run += 1
            self.stop.in_step = False
            losses.append(loss.item())
            if self.stop.requested:
                raise KeyboardInterrupt
            now = time.time()
            if now - last_log >= cfg.log_every_s or self.state[key] == total:
                batch = cfg.decoder_batch if phase == "decoder" else cfg.oracle_batch
                rate = (self.state[key] - step_start) * batch / max(now - t_start, 1e-6)
                self.log({"phase": phase, "step": self.state[key], "of": total, "lr": opt.param_groups[0]["lr"],
                          "loss": round(sum(losses) / len(losses), 5), "samples_per_s": round(rate, 2)})
                losses, last_log = [], now
            if cfg.ckpt_every_s and now - last_ckpt > cfg.ckpt_every_s:
                self.save(opt)
                last_ckpt = time.time()
        for p in params:
            p.requires_grad_(False)
        self.oracle.eval()
        self.save(opt)
        self.optimizer = None
        return self.state[key] >= total

    def run(self, minutes: float, stop_after: int | None) -> dict:
        start = time.time()
        deadline = start + minutes * 60
        self.steps_run = 0
        self.optimizer = None
        flow = [("before", None), ("decoder", "after_decoder"), ("oracle", "after")]
        try:
            for phase, then in flow:
                if phase == "before":
                    if "before" not in self.state["measurements"]:
                        self.measure("before")
                        self.state["phase"] = "decoder"
                        self.save()
                    continue
                if phase == "decoder" and self.cfg.decoder_steps == 0 and self.state["phase"] == phase:
                    self.state["phase"] = "oracle"  # the oracle alone (the shipped decoder kept): no phase 1
                    self.save()
                    continue
                if self.state["phase"] == phase:
                    if not self.train(phase, deadline, stop_after):
                        return self.result(done=False)
                    self.state["phase"] = then
                    self.save()
                if self.state["phase"] == then:
                    self.measure(then)
                    self.state["phase"] = {"after_decoder": "oracle", "after": "done"}[then]
                    if then == "after":
                        m = self.state["measurements"]
                        self.state["guard"] = guard(m["before"], m["after"], self.cfg.guard_tolerance)
                        self.state["b_target"] = {"before": b_summary(m["before"]), "after": b_summary(m["after"])}
                    self.save()
        except KeyboardInterrupt:
            self.stop.in_step, self.stop.requested = True, False  # a second signal waits for this checkpoint
            phase, opt = self.optimizer or (None, None)
            self.save(opt if phase == self.state["phase"] else None)  # AdamW's moments of the phase in progress
            raise Interrupted(f"read-out interrupted; checkpoint saved, continue with --resume (--out {self.out})") \
                from None
        finally:
            self.state["seconds"] = self.state.get("seconds", 0.0) + time.time() - start
            if (self.out / "state.json").is_file():
                atomic_write_json(self.out / "state.json", self.state)
        return self.result(done=True)

    def result(self, done: bool) -> dict:
        out = {"done": done, "phase": self.state["phase"], "decoder_step": self.state["decoder_step"],
               "oracle_step": self.state["oracle_step"]}
        if self.state["phase"] == "done":
            out.update(guard=self.state["guard"], b_target=self.state["b_target"])
        return out


def run_readout(ckpt: Path | str, out: Path, minutes: float, resume: bool = False,
                cfg: ReadoutConfig = ReadoutConfig(), stop_after_steps: int | None = None,
                world_name: str | None = None) -> dict:
    """Run (or go on with) a read-out; returns where it stands and, once done, the guard and the (b) target.
    `ckpt`: a train-base checkpoint folder, or "builtin:toy" with `world_name` (the world to read it on)."""
    if resume and not (out / "state.json").is_file():
        raise UserError(f"--resume: no state.json in {out}; start without --resume")
    if not resume and (out / "state.json").is_file():
        raise UserError(f"--out {out} already holds a read-out; pass --resume to go on, or choose another --out")
    if resume:  # the recorded configuration goes on
        saved = json.loads((out / "state.json").read_text())["config"]
        cfg = replace(ReadoutConfig(), **{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()
                                          if k in {f.name for f in fields(cfg)}})
    readout = Readout(ckpt, out, cfg, resume, world_name or (cfg.world if resume else None))
    out.mkdir(parents=True, exist_ok=True)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, readout.stop)
    try:
        return readout.run(minutes, stop_after_steps)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def load_for_export(readout_dir: Path, ckpt: Path) -> dict:
    """The fine-tuned VAE and oracle of a finished read-out whose guard passed on its own world and whose frozen
    encoder is the checkpoint's, bit for bit; raises UserError otherwise (the result must not be used)."""
    path = readout_dir / "state.json"
    if not path.is_file():
        raise UserError(f"--readout {readout_dir}: no state.json there; pass the folder `readout` wrote")
    state = json.loads(path.read_text())
    if state.get("phase") != "done":
        raise UserError(f"--readout {readout_dir}: not finished (phase {state.get('phase')}); continue it with "
                        f"`python -m tools.toyworld readout --ckpt {state['source']['ckpt']} --out {readout_dir} "
                        "--resume`")
    # The oracle written into a model folder is that model's instrument only (the shipped oracle stays v1's): it
    # must not read its own world worse than before; drops on the other worlds are recorded, not refused
    # (docs/toyworld.md, "v2c": the instrument, decided explicitly).
    own = state["source"]["world"]
    dropped_own = [d for d in state["guard"]["dropped"] if d["world"] == own]
    if dropped_own:
        heads = ", ".join(f"{d['head']} ({d['world']}: {d['before']} -> {d['after']})" for d in dropped_own)
        raise UserError(f"--readout {readout_dir}: its oracle reads clean renders of its own world worse than "
                        f"before ({heads}); this read-out must not be used")
    vae_sd = load_sharded(readout_dir, "vae")
    ckpt_vae = load_sharded(ckpt, "vae")
    if ckpt_vae is None or digest(encoder_part(vae_sd)) != digest(encoder_part(ckpt_vae)):
        raise UserError(f"--readout {readout_dir}: its VAE encoder is not --ckpt {ckpt}'s (it was made from "
                        f"{state['source']['ckpt']}); the UNet's latents would not match its decoder")
    summary = {"readout": str(readout_dir), "guard": state["guard"], "guard_world": own, "b_target": state["b_target"],
               "decoder_steps": state["decoder_step"], "oracle_steps": state["oracle_step"],
               "git_commit": state.get("git_commit"), "config": state["config"]}
    return {"vae": vae_sd, "oracle": load_sharded(readout_dir, "oracle"), "summary": summary}
