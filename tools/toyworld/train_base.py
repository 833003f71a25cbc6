"""Train `builtin:toy` on the toy world: VAE, then the oracle, then latent diffusion (UNet + text encoder).

    python -m tools.toyworld train-base --out DIR --device cuda --minutes 8 [--resume DIR_OR_CKPT] [--recipe v2]

Recipes (tools/toyworld/recipes.py): "v1" made the shipped model from scratch on a GPU; "v2" and its successors
(docs/toyworld.md, "v2 recipe" onwards) start from a shipped model's weights (`init_from`: its VAE and the shipped
oracle stay frozen, the UNet and the text encoder go on training), on a world whose second colours are only white
and black, with prompts that name the pattern, 32 text positions, latents computed once and cached, checkpoints
every few minutes and the ceiling gate measured periodically; sized for 2 CPU cores.

Recipe (see docs/toyworld.md for the reasons and the measured curve):
- data rendered on the fly on the training device from a seeded generator, 4 styles x 5 ambiances x 6 classes x
  6 colours x 4 patterns; held-out subjects never appear;
- VAE first (64x64x3 -> 16x16x4, L1 + small KL), its latent scale measured afterwards (`scaling_factor`);
- the oracle next (half clean renders, half VAE reconstructions), so training can report what samples show;
- then epsilon-prediction latent diffusion on the linear DDPM schedule (1000 steps), UNet with cross-attention at
  every level, the CLIP text encoder trained jointly, 10% of prompts dropped to "" (classifier-free guidance),
  AdamW with warm-up then constant LR, bf16 autocast on CUDA, EMA of UNet and text-encoder weights (used for
  sampling and for the shipped model).
Every `--eval-every` seconds the EMA model samples fixed prompts with the shipped DPM-Solver++ scheduler, and the
oracle's recognition rates are logged to DIR/train.jsonl.

The checkpoint is a flat folder (so it travels through narrow file transfers): state.json plus safetensors shards
of at most 12 MB. `export_pipeline` turns it into the shipped diffusers folder (fp16) and oracle file.
"""

from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from palpcompose.errors import Interrupted
from palpcompose.fsutil import atomic_save_safetensors, atomic_write_json, atomic_write_text
from palpcompose.toyworld import oracle as oracle_mod
from palpcompose.toyworld import tokenizer as tok_mod
from palpcompose.toyworld import world
from palpcompose.toyworld.ceiling import evaluate_pipeline
from palpcompose.toyworld.worlds import world_of_config
from tools.toyworld import latent_cache
from tools.toyworld.checkpoint import (
    digest,
    flat_optim,
    git_commit,
    load_sharded,
    restore_optim,
    save_sharded,
)
from tools.toyworld.recipes import RECIPES, TrainConfig, branch_mismatch, config_from_state, param_groups

# ----------------------------------------------------------------------------------------------------------------
# Model definitions
# ----------------------------------------------------------------------------------------------------------------


def build_vae():
    """Fresh VAE of `builtin:toy` (64x64x3 <-> 16x16x4; seeded by the caller)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=world.SIZE,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
    )


def build_models(tokenizer, text_tokens: int = 77):
    """Fresh VAE, text encoder and UNet of `builtin:toy` (seeded by the caller)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = build_vae()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_attention_heads=4,
        num_hidden_layers=3, max_position_embeddings=text_tokens, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(
        sample_size=world.SIZE // 4, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 64, 128), layers_per_block=1, cross_attention_dim=128, attention_head_dim=4,
        norm_num_groups=32,
    )
    return vae, text_encoder, unet


def noise_schedule_config(prediction_type: str) -> dict:
    """The DDPM training schedule (linear betas, as in DDPM): strong enough noise at the end for 16x16 latents.
    v-prediction: with epsilon prediction the near-pure-noise steps teach almost nothing (x_t is the noise), and
    the first epsilon run's samples came out washed out and off-prompt (docs/toyworld.md)."""
    return {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
            "prediction_type": prediction_type, "timestep_spacing": "trailing", "steps_offset": 1}


def sampling_scheduler(prediction_type: str):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**noise_schedule_config(prediction_type), algorithm_type="dpmsolver++",
                                       solver_order=2)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, out: Path, device: str, cfg: TrainConfig, resume: Path | None, branch_from: Path | None = None):
        """`resume`: go on with a checkpoint's recipe, weights and AdamW moments. `branch_from`: start a new run of
        `cfg` from a checkpoint's weights, EMA and step count, with fresh AdamW moments (its cached latents are
        hard-linked into `out`: a branch keeps its source's world, seed and solid share)."""
        self.out, self.device, self.cfg = out, torch.device(device), cfg
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:  # the tokenizer is rebuilt from code; the checkpoint stays flat
            self.tokenizer = tok_mod.make_tokenizer(tmp, model_max_length=cfg.text_tokens)
        torch.manual_seed(cfg.seed)
        self.vae, self.text_encoder, self.unet = build_models(self.tokenizer, cfg.text_tokens)
        self.oracle = oracle_mod.Oracle()
        self.state = {"vae_done": False, "oracle_done": False, "unet_steps": 0, "unet_samples": 0,
                      "unet_seconds": 0.0, "scaling_factor": 1.0, "oracle_accuracy": {}, "config": asdict(cfg),
                      "prediction_type": cfg.prediction_type, "cache_chunks": 0}
        self.code_commit = git_commit()  # the code this process imported (a later edit of the tree does not count)
        self.state["git_commit"] = self.code_commit
        self.ema = None
        self.optim_state = None
        if resume is not None:
            self._load(resume)
        elif branch_from is not None:
            self._branch(branch_from)
        elif cfg.init_from:
            self._init_from(cfg.init_from)
        for m in (self.vae, self.text_encoder, self.unet, self.oracle):
            m.to(self.device)
        # the VAE and the oracle are instruments outside their own phases (train_vae / train_oracle switch them to
        # training): in eval mode, the oracle's BatchNorm reads with its running statistics and never updates them
        self.vae.eval()
        self.oracle.eval()
        if self.ema is None:
            self.ema = {k: v.detach().clone().float() for k, v in self._diffusion_params().items()}
        self.ema = {k: v.to(self.device) for k, v in self.ema.items()}
        self.g = torch.Generator(device=self.device).manual_seed(cfg.seed + 1000 * self.state["unet_steps"] + 1)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.cpu_bf16))
        self.cache = None
        self._token_cache: dict[str, list[int]] = {}
        self.log_path = out / "train.jsonl"

    # -- state --------------------------------------------------------------------------------------------------
    def _diffusion_params(self) -> dict[str, torch.Tensor]:
        params = {f"unet.{k}": v for k, v in self.unet.state_dict().items()}
        params.update({f"text_encoder.{k}": v for k, v in self.text_encoder.state_dict().items()})
        return params

    def _load(self, folder: Path) -> None:
        folder = folder if folder.is_dir() else folder.parent
        self.state.update(json.loads((folder / "state.json").read_text()))
        for name, module in (("vae", self.vae), ("oracle", self.oracle)):
            sd = load_sharded(folder, name)
            if sd is not None:
                module.load_state_dict(sd)
        raw = load_sharded(folder, "diffusion")
        if raw is not None:
            self.unet.load_state_dict({k[5:]: v for k, v in raw.items() if k.startswith("unet.")})
            self.text_encoder.load_state_dict({k[13:]: v for k, v in raw.items() if k.startswith("text_encoder.")},
                                              strict=False)
        self.ema = load_sharded(folder, "ema")
        self.optim_state = load_sharded(folder, "optim")
        self.vae.register_to_config(scaling_factor=self.state["scaling_factor"])
        previous = self.state.get("prediction_type", "epsilon")
        if raw is not None and previous != self.cfg.prediction_type:
            # a new training objective: the UNet keeps its weights (features), the EMA and step count restart
            self.state["switched_objective"] = {"from": previous, "after_steps": self.state["unet_steps"],
                                                "after_samples": self.state["unet_samples"]}
            self.state.update(unet_steps=0, unet_samples=0, unet_seconds=0.0)
            self.ema = None
        self.state["prediction_type"] = self.cfg.prediction_type

    def _branch(self, source: Path) -> None:
        mismatch = branch_mismatch(config_from_state(json.loads((source / "state.json").read_text()).get("config", {})),
                                   self.cfg)
        if mismatch:  # the CLI refuses this before anything is written; this guards other callers
            raise ValueError(f"branch from {source}: {mismatch}")
        self._load(source)
        self.optim_state = None
        self.state["config"] = asdict(self.cfg)
        self.state["branched_from"] = {"path": str(source.resolve()), "unet_steps": self.state["unet_steps"],
                                       "git_commit": self.state.get("git_commit")}
        self.state["git_commit"] = self.code_commit
        if (source / "cache").is_dir() and not (self.out / "cache").exists():
            (self.out / "cache").mkdir()
            for f in sorted((source / "cache").glob("chunk-*.safetensors")):
                os.link(f, self.out / "cache" / f.name)

    def _init_from(self, spec: str) -> None:
        """Warm start from a shipped diffusers folder: VAE (frozen, its scaling factor), the shipped oracle (frozen),
        UNet and text encoder (position embeddings cut to `text_tokens`: the encoder is causal, so the first
        positions' states are unchanged)."""
        from safetensors.torch import load_file

        from palpcompose.models import resolve_base_model

        folder = Path(resolve_base_model(spec).location)
        weights = {name: {k: v.float() for k, v in load_file(str(next((folder / name).glob("*.safetensors")))).items()}
                   for name in ("vae", "unet", "text_encoder")}
        self.vae.load_state_dict(weights["vae"])
        self.state["scaling_factor"] = json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"]
        self.vae.register_to_config(scaling_factor=self.state["scaling_factor"])
        self.unet.load_state_dict(weights["unet"])
        te = {k: v for k, v in weights["text_encoder"].items() if not k.endswith("position_ids")}
        pos = next(k for k in te if k.endswith("embeddings.position_embedding.weight"))
        te[pos] = te[pos][: self.cfg.text_tokens]
        self.text_encoder.load_state_dict(te)
        if self.cfg.oracle_from:  # a read-out's oracle, tuned to read this world (e.g. v2b's larger objects)
            oracle_sd = load_sharded(Path(self.cfg.oracle_from), "oracle")
            if oracle_sd is None:
                raise FileNotFoundError(f"oracle_from {self.cfg.oracle_from}: no oracle-*.safetensors there")
            self.oracle.load_state_dict(oracle_sd)
        else:
            self.oracle.load_state_dict(oracle_mod.load_oracle().state_dict())
        self.state.update(vae_done=True, oracle_done=True, init_from={
            "spec": spec, "sha256": {n: digest(w) for n, w in weights.items()},
            "oracle_sha256": digest(self.oracle.state_dict())})
        self.vae.eval().requires_grad_(False)
        self.oracle.eval().requires_grad_(False)

    def save(self, optimizer=None) -> None:
        save_sharded(self.out, "vae", self.vae.state_dict())
        save_sharded(self.out, "oracle", self.oracle.state_dict())
        # raw weights and AdamW's moments in fp32, so a resumed run goes on where it stopped; EMA in fp32 (shipped)
        save_sharded(self.out, "diffusion", self._diffusion_params())
        save_sharded(self.out, "ema", self.ema)
        if optimizer is not None:
            save_sharded(self.out, "optim", flat_optim(optimizer))
        self.state["git_commit_last_save"] = self.code_commit
        atomic_write_json(self.out / "state.json", self.state)

    def log(self, record: dict) -> None:
        record = {"time": round(time.time(), 1), **record}
        print(json.dumps(record), flush=True)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    # -- data ---------------------------------------------------------------------------------------------------
    def render_batch(self, n: int, styles=world.STYLES, exclude=True):
        s = world_of_config(self.cfg).scenes(n, self.g, self.device, styles=styles, exclude_held_out_subjects=exclude,
                                             solid_fraction=self.cfg.solid_fraction)
        return s, world.render(s, self.g)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        ids = []
        for p in prompts:
            if p not in self._token_cache:
                self._token_cache[p] = self.tokenizer(p, padding="max_length", max_length=self.cfg.text_tokens,
                                                      truncation=True).input_ids
            ids.append(self._token_cache[p])
        return torch.tensor(ids, device=self.device)

    @torch.no_grad()
    def to_latents(self, images: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            dist = self.vae.encode(images * 2 - 1).latent_dist
        return dist.sample(generator=self.g).float() * self.vae.config.scaling_factor

    # -- phase 1: VAE -------------------------------------------------------------------------------------------
    def train_vae(self, seconds: float) -> None:
        vae = self.vae.train()
        opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
        start, step = time.time(), 0
        while time.time() - start < seconds:
            _, images = self.render_batch(self.cfg.vae_batch, styles=world.ALL_STYLES, exclude=False)
            x = images * 2 - 1
            with self.autocast:
                dist = vae.encode(x).latent_dist
                recon = vae.decode(dist.sample(generator=self.g)).sample
            rec = (recon.float() - x).abs().mean()
            kl = dist.kl().mean() / x[0].numel()
            loss = rec + 1e-3 * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 200 == 0:
                self.log({"phase": "vae", "step": step, "l1": round(rec.item(), 4), "kl": round(kl.item(), 3)})
        vae.eval().requires_grad_(False)
        with torch.no_grad():
            _, images = self.render_batch(4 * self.cfg.vae_batch)
            with self.autocast:
                z = vae.encode(images * 2 - 1).latent_dist.mean.float()
        self.state["scaling_factor"] = float(1.0 / z.std())
        vae.register_to_config(scaling_factor=self.state["scaling_factor"])
        self.state["vae_done"] = True
        self.log({"phase": "vae", "done_steps": step, "scaling_factor": self.state["scaling_factor"]})

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            z = self.vae.encode(images * 2 - 1).latent_dist.sample(generator=self.g)
            return ((self.vae.decode(z).sample.float() + 1) / 2).clamp(0, 1)

    # -- phase 2: oracle ----------------------------------------------------------------------------------------
    def train_oracle(self, seconds: float) -> None:
        model = self.oracle.train().requires_grad_(True)
        opt = torch.optim.AdamW(model.parameters(), lr=self.cfg.oracle_lr, weight_decay=1e-4)
        start, step = time.time(), 0
        while time.time() - start < seconds:
            s, images = self.render_batch(self.cfg.oracle_batch, styles=world.ALL_STYLES, exclude=False)
            half = images.shape[0] // 2
            images = torch.cat([images[:half], self.reconstruct(images[half:])])
            frac = min(1.0, (time.time() - start) / seconds)
            for group in opt.param_groups:
                group["lr"] = self.cfg.oracle_lr * 0.5 * (1 + math.cos(math.pi * frac))
            with self.autocast:
                logits = model(images)
            targets = oracle_mod.oracle_targets(s)
            loss = sum(F.cross_entropy(logits[k].float(), targets[k], ignore_index=-100) for k in logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 200 == 0:
                self.log({"phase": "oracle", "step": step, "loss": round(loss.item(), 4)})
        model.eval().requires_grad_(False)
        g = torch.Generator(device=self.device).manual_seed(999_999)
        n = self.cfg.oracle_eval_images
        s = world.sample_scenes(n, g, self.device, styles=world.ALL_STYLES, exclude_held_out_subjects=False)
        images = world.render(s, g)
        acc_clean = oracle_mod.accuracy(model, images, s)
        acc_vae = oracle_mod.accuracy(model, self.reconstruct(images), s)
        self.state["oracle_accuracy"] = {"clean": acc_clean, "vae": acc_vae, "held_out_images": n}
        self.state["oracle_done"] = True
        self.log({"phase": "oracle", "done_steps": step, "accuracy_clean": acc_clean, "accuracy_vae": acc_vae})

    # -- phase 2b (v2): latents computed once --------------------------------------------------------------------
    def cache_chunks_wanted(self) -> int:
        return math.ceil(self.cfg.latent_cache / self.cfg.cache_chunk)

    def grow_cache(self) -> None:
        """Add the next missing chunk (prefix order) and reload the cache."""
        chunk = self.state["cache_chunks"]
        timing = latent_cache.build_chunk(self.out, chunk, self.cfg, self.vae, self.device)
        if timing:
            self.log({"phase": "cache", "chunk": chunk + 1, "of": self.cache_chunks_wanted(), **timing})
        self.load_cache()

    def load_cache(self) -> None:
        self.cache = latent_cache.load(self.out, self.cache_chunks_wanted(), self.cfg.latent_cache)
        self.state["cache_chunks"] = self.cache["chunks"]

    def lr_at(self, step: int, step0: int) -> float:
        cfg = self.cfg
        # warm-up from the first step, and again after a restart without AdamW's moments (old checkpoints)
        since = step + 1 if self.optim_state is not None or step0 == 0 else step - step0 + 1
        warm = min(1.0, since / cfg.warmup_steps)
        if cfg.lr_schedule == "cosine" and cfg.total_steps:
            frac = min(1.0, step / cfg.total_steps)
            return cfg.lr * warm * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))
        return cfg.lr * warm

    # -- phase 3: latent diffusion ------------------------------------------------------------------------------
    def train_unet(self, seconds: float, stop_at_step: int | None = None) -> None:
        cfg = self.cfg
        from diffusers import DDPMScheduler

        sched = DDPMScheduler(**noise_schedule_config(cfg.prediction_type))
        alphas = sched.alphas_cumprod.to(self.device)
        self.unet.train().requires_grad_(True)
        self.text_encoder.train().requires_grad_(True)
        params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        opt = torch.optim.AdamW(param_groups(self.unet, self.text_encoder, cfg), lr=cfg.lr, weight_decay=0.01)
        if self.optim_state is not None:
            restore_optim(opt, self.optim_state)
        self.optimizer = opt
        if cfg.latent_cache and self.cache is None:
            self.state["cache_chunks"] = 0
            if not latent_cache.chunk_path(self.out, 0).is_file():
                self.grow_cache()
            self.load_cache()
        start, step0 = time.time(), self.state["unet_steps"]
        last_eval = last_log = last_ckpt = last_gate = time.time()
        seconds_before = self.state["unet_seconds"]
        losses = []
        while time.time() - start < seconds or self.state["unet_steps"] == step0:  # at least one step per run
            step = self.state["unet_steps"]
            if cfg.total_steps and cfg.lr_schedule == "cosine" and step >= cfg.total_steps:
                break
            if stop_at_step is not None and step >= stop_at_step:
                break
            for group in opt.param_groups:
                group["lr"] = self.lr_at(step, step0) * group.get("lr_mult", 1.0)
            if self.cache is not None:
                if self.state["cache_chunks"] < self.cache_chunks_wanted() and step % cfg.cache_every_steps == 0:
                    self.grow_cache()  # latents are computed while training starts, one chunk every few steps
                s, latents = latent_cache.draw(self.cache, cfg.batch, self.g, self.vae.config.scaling_factor)
                latents = latents.to(self.device)
            else:
                s, images = self.render_batch(cfg.batch)
                latents = self.to_latents(images)
            prompts = world.prompts_for(s, self.g, cfg.drop_color, cfg.drop_pattern)
            drop = (torch.rand(len(prompts), generator=self.g, device=self.device) < cfg.cfg_dropout).tolist()
            prompts = ["" if d else p for p, d in zip(prompts, drop)]
            noise = torch.randn(latents.shape, generator=self.g, device=self.device)
            t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=self.g,
                              device=self.device)
            a = alphas[t].view(-1, 1, 1, 1)
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise  # DDPM forward process q(z_t | z_0)
            with self.autocast:
                cond = self.text_encoder(self.encode_prompts(prompts))[0]
                pred = self.unet(noisy, t, cond).sample
            if cfg.prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1 - a) z_0 (Salimans & Ho 2022)
                target = a.sqrt() * noise - (1 - a).sqrt() * latents
            else:
                target = noise
            loss = F.mse_loss(pred.float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            self._update_ema()
            losses.append(loss.item())
            self.state["unet_steps"] += 1
            self.state["unet_samples"] += cfg.batch
            now = time.time()
            self.state["unet_seconds"] = seconds_before + now - start
            if now - last_eval > cfg.eval_every_s:
                self._log_progress(losses, start, step0)
                losses, last_eval, last_log = [], time.time(), time.time()
            elif now - last_log > cfg.log_every_s:
                self._log_loss(losses, start, step0, opt)
                losses, last_log = [], time.time()
            if cfg.ckpt_every_s and now - last_ckpt > cfg.ckpt_every_s:
                self.save(opt)
                last_ckpt = time.time()
            if cfg.gate_every_s and now - last_gate > cfg.gate_every_s:
                self.gate()
                last_gate = time.time()
        self.state["unet_seconds"] = seconds_before + time.time() - start
        if cfg.eval_every_s < 1e11:
            self._log_progress(losses, start, step0)
        else:
            self._log_loss(losses, start, step0, opt)

    def _log_loss(self, losses, start, step0, opt) -> None:
        rate = (self.state["unet_steps"] - step0) * self.cfg.batch / max(time.time() - start, 1e-6)
        self.log({"phase": "unet", "step": self.state["unet_steps"], "samples": self.state["unet_samples"],
                  "minutes": round(self.state["unet_seconds"] / 60, 2), "lr": opt.param_groups[0]["lr"],
                  "loss": round(sum(losses) / max(len(losses), 1), 4), "samples_per_s": round(rate, 1)})

    @torch.no_grad()
    def gate(self) -> dict:
        """The ceiling gate, cheap version (gate_subjects subjects, one seed, gate_old_bar_prompts old-bar prompts),
        on the EMA weights; logged as phase "gate"."""
        from palpcompose.toyworld import ceiling

        t0 = time.time()
        pipe = self.pipeline()
        report = ceiling.run_ceiling(pipe, self.oracle, self.cfg.gate_subjects, (0,), self.cfg.sample_steps, 5.0,
                                     old_bar_prompts=self.cfg.gate_old_bar_prompts,
                                     color2_choices=self.cfg.color2_choices)
        s = report["summary"]
        record = {"phase": "gate", "step": self.state["unet_steps"], "samples": self.state["unet_samples"],
                  "described": s["described"]["mean"], "described_by_style": s["described"]["by_style"],
                  "described_min_cell": min(s["described"]["cells"].values()),
                  "described_heads": s["described"]["heads"], "class_word": s["class_word"]["mean"],
                  "class_word_heads": s["class_word"]["heads"], "old_bar": report["old_bar"],
                  "passed": report["verdict"]["passed"], "seconds": round(time.time() - t0, 1)}
        self.log(record)
        self.state.setdefault("gates", []).append(record)
        return record

    @torch.no_grad()
    def _update_ema(self) -> None:
        d = min(self.cfg.ema_decay, (1 + self.state["unet_steps"]) / (10 + self.state["unet_steps"]))
        for k, v in self._diffusion_params().items():
            if v.is_floating_point():
                self.ema[k].lerp_(v.float(), 1 - d)
            else:
                self.ema[k].copy_(v)

    def _log_progress(self, losses, start, step0) -> None:
        elapsed = time.time() - start
        rate = (self.state["unet_steps"] - step0) * self.cfg.batch / max(elapsed, 1e-6)
        acc = self.evaluate(self.cfg.eval_prompts, self.cfg.guidance_scale, self.cfg.sample_steps, seed=0)
        self.log({"phase": "unet", "step": self.state["unet_steps"], "samples": self.state["unet_samples"],
                  "minutes": round(self.state["unet_seconds"] / 60, 2),
                  "loss": round(sum(losses) / max(len(losses), 1), 4), "samples_per_s": round(rate),
                  "cfg": self.cfg.guidance_scale, **{f"acc_{k}": v for k, v in acc.items()}})

    # -- sampling with the EMA weights, through the real diffusers pipeline -------------------------------------
    def pipeline(self, raw: bool = False):
        """A StableDiffusionPipeline holding copies of the EMA weights (`raw`: the trained weights themselves, for
        diagnostics) and the shipped scheduler."""
        from diffusers import StableDiffusionPipeline

        weights = self._diffusion_params() if raw else self.ema
        _, text_encoder, unet = build_models(self.tokenizer, self.cfg.text_tokens)
        unet.load_state_dict({k[5:]: v for k, v in weights.items() if k.startswith("unet.")})
        text_encoder.load_state_dict({k[13:]: v for k, v in weights.items() if k.startswith("text_encoder.")},
                                     strict=False)
        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=text_encoder.eval(), tokenizer=self.tokenizer, unet=unet.eval(),
            scheduler=sampling_scheduler(self.cfg.prediction_type), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(self.device)

    @torch.no_grad()
    def evaluate(self, n: int, guidance_scale: float, steps: int, seed: int, pipe=None) -> dict[str, float]:
        pipe = pipe or self.pipeline()
        return evaluate_pipeline(pipe, self.oracle, n, guidance_scale, steps, seed, self.device, self.autocast)


def train_base(out: Path, device: str, minutes: float, resume: Path | None = None, cfg: TrainConfig = RECIPES["v1"],
               final_eval: int = 200, more_oracle_minutes: float = 0.0, stop_at_step: int | None = None,
               branch_from: Path | None = None) -> dict:
    """Run the phases that are not done yet within `minutes` (and the UNet up to `stop_at_step` steps at most),
    save the checkpoint, and evaluate on `final_eval` prompts at several guidance scales. Returns the final
    evaluation. `branch_from`: see Trainer."""
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    total = minutes * 60
    start = time.time()
    if threading.current_thread() is threading.main_thread():  # a stopped session's SIGTERM saves like Ctrl-C
        signal.signal(signal.SIGTERM, _raise_interrupt)
    trainer = Trainer(out, device, cfg, resume, branch_from)
    try:
        if not trainer.state["vae_done"]:
            trainer.train_vae(total * cfg.vae_fraction)
            trainer.save()
        if not trainer.state["oracle_done"] or more_oracle_minutes > 0:
            extra = more_oracle_minutes * 60 if trainer.state["oracle_done"] else total * cfg.oracle_fraction
            trainer.train_oracle(extra)
            trainer.save()
        remaining = total - (time.time() - start)
        trainer.train_unet(max(remaining, 0.0), stop_at_step)
        if cfg.gate_every_s and stop_at_step is None:  # a run stopped at a step (a probe's arm) is measured apart
            trainer.gate()
    except KeyboardInterrupt:
        # an interrupted phase is redone on resume; finished phases and the UNet's progress are kept
        trainer.save(getattr(trainer, "optimizer", None))
        raise Interrupted(f"training interrupted; checkpoint saved, continue with --resume {out}") from None
    trainer.save(getattr(trainer, "optimizer", None))
    result = {"unet_steps": trainer.state["unet_steps"], "unet_samples": trainer.state["unet_samples"],
              "steps": cfg.sample_steps, "prompts": final_eval, "by_guidance_scale": {}}
    if final_eval:
        pipe = trainer.pipeline()
        for scale in (1.5, 3.0, 5.0, 7.5):
            acc = trainer.evaluate(final_eval, scale, cfg.sample_steps, seed=1, pipe=pipe)
            result["by_guidance_scale"][str(scale)] = acc
            trainer.log({"phase": "final_eval", "cfg": scale, **acc})
    trainer.state["final_eval"] = result
    atomic_write_json(out / "state.json", trainer.state)
    return result


def _raise_interrupt(*_):
    raise KeyboardInterrupt


def export_pipeline(ckpt: Path, dest: Path, oracle_path: Path, readout: dict | None = None, raw: bool = False) -> None:
    """Write the shipped `builtin:toy` diffusers folder (fp16, EMA weights) and the oracle (fp16) from a checkpoint;
    `readout` (readout.load_for_export): its fine-tuned VAE decoder and oracle replace the checkpoint's. `raw`: the
    trained weights instead of the EMA (a diagnostic export, recorded in training.json; never shipped)."""
    cfg = config_from_state(json.loads((ckpt / "state.json").read_text()).get("config", {}))
    trainer = Trainer(ckpt, "cpu", cfg, ckpt)
    if readout is not None:
        trainer.vae.load_state_dict(readout["vae"])
        trainer.oracle.load_state_dict(readout["oracle"])
    pipe = trainer.pipeline(raw=raw)
    pipe.to(torch.float16)
    dest.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(dest, safe_serialization=True)
    tok_mod.write_tokenizer_files(dest / "tokenizer")  # vocab.json + merges.txt too, for slow-tokenizer loaders
    atomic_save_safetensors(oracle_path, {k: v.half() if v.is_floating_point() else v
                                          for k, v in trainer.oracle.state_dict().items()})
    summary = {k: trainer.state.get(k) for k in ("unet_steps", "unet_samples", "unet_seconds", "scaling_factor",
                                                 "oracle_accuracy", "final_eval", "config", "init_from",
                                                 "git_commit", "gates", "branched_from")}
    summary["weights"] = "raw" if raw else "ema"
    w = world_of_config(cfg)
    summary["world"] = {"color2_choices": list(w.color2_choices) if w.color2_choices else None,
                        **{k: list(v) for k, v in w.layout.items()}}
    if readout is not None:
        summary["readout"] = readout["summary"]
    atomic_write_text(dest / "training.json", json.dumps(summary, indent=2) + "\n")
