"""Train `builtin:toy` from scratch on the toy world: VAE, then the oracle, then latent diffusion (UNet + text encoder).

    python -m palpcompose.toyworld train-base --out DIR --device cuda --minutes 8 [--resume DIR_OR_CKPT]

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
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from palpcompose.errors import Interrupted
from palpcompose.fsutil import atomic_save_safetensors, atomic_write_json, atomic_write_text
from palpcompose.toyworld import oracle as oracle_mod
from palpcompose.toyworld import tokenizer as tok_mod
from palpcompose.toyworld import world

SHARD_BYTES = 12 * 1024 * 1024


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    batch: int = 512
    lr: float = 8e-4
    warmup_steps: int = 300
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1
    drop_color: float = 0.1  # prompts sometimes leave the colour word out (the render still has a colour)
    drop_pattern: float = 0.3
    vae_fraction: float = 0.15  # shares of --minutes for the VAE and the oracle phases (skipped when resumed)
    oracle_fraction: float = 0.10
    eval_every_s: float = 60.0
    eval_prompts: int = 64
    oracle_eval_images: int = 2048
    vae_batch: int = 256
    oracle_batch: int = 512
    oracle_lr: float = 2e-3
    sample_steps: int = 20
    guidance_scale: float = 3.0
    prediction_type: str = "v_prediction"


# ----------------------------------------------------------------------------------------------------------------
# Model definitions
# ----------------------------------------------------------------------------------------------------------------


def build_models(tokenizer):
    """Fresh VAE, text encoder and UNet of `builtin:toy` (seeded by the caller)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=world.SIZE,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_attention_heads=4,
        num_hidden_layers=3, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
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
# Checkpoints: flat folder, sharded safetensors
# ----------------------------------------------------------------------------------------------------------------


def save_sharded(folder: Path, name: str, tensors: dict[str, torch.Tensor], dtype=None) -> None:
    shard, size, index = {}, 0, 0
    for key in sorted(tensors):
        t = tensors[key].detach().cpu()
        t = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        if shard and size + t.numel() * t.element_size() > SHARD_BYTES:
            atomic_save_safetensors(folder / f"{name}-{index:02d}.safetensors", shard)
            shard, size, index = {}, 0, index + 1
        shard[key] = t
        size += t.numel() * t.element_size()
    atomic_save_safetensors(folder / f"{name}-{index:02d}.safetensors", shard)
    for stale in folder.glob(f"{name}-*.safetensors"):
        if int(stale.stem.rsplit("-", 1)[1]) > index:
            stale.unlink()


def load_sharded(folder: Path, name: str) -> dict[str, torch.Tensor] | None:
    from safetensors.torch import load_file

    files = sorted(folder.glob(f"{name}-*.safetensors"))
    if not files:
        return None
    out = {}
    for f in files:
        out.update({k: v.float() for k, v in load_file(str(f)).items()})
    return out


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, out: Path, device: str, cfg: TrainConfig, resume: Path | None):
        self.out, self.device, self.cfg = out, torch.device(device), cfg
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:  # the tokenizer is rebuilt from code; the checkpoint stays flat
            self.tokenizer = tok_mod.make_tokenizer(tmp)
        torch.manual_seed(cfg.seed)
        self.vae, self.text_encoder, self.unet = build_models(self.tokenizer)
        self.oracle = oracle_mod.Oracle()
        self.state = {"vae_done": False, "oracle_done": False, "unet_steps": 0, "unet_samples": 0,
                      "unet_seconds": 0.0, "scaling_factor": 1.0, "oracle_accuracy": {}, "config": asdict(cfg),
                      "prediction_type": cfg.prediction_type}
        self.ema = None
        if resume is not None:
            self._load(resume)
        for m in (self.vae, self.text_encoder, self.unet, self.oracle):
            m.to(self.device)
        if self.ema is None:
            self.ema = {k: v.detach().clone().float() for k, v in self._diffusion_params().items()}
        self.ema = {k: v.to(self.device) for k, v in self.ema.items()}
        self.g = torch.Generator(device=self.device).manual_seed(cfg.seed + 1000 * self.state["unet_steps"] + 1)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else torch.autocast("cpu", enabled=False))
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
        self.vae.register_to_config(scaling_factor=self.state["scaling_factor"])
        previous = self.state.get("prediction_type", "epsilon")
        if raw is not None and previous != self.cfg.prediction_type:
            # a new training objective: the UNet keeps its weights (features), the EMA and step count restart
            self.state["switched_objective"] = {"from": previous, "after_steps": self.state["unet_steps"],
                                                "after_samples": self.state["unet_samples"]}
            self.state.update(unet_steps=0, unet_samples=0, unet_seconds=0.0)
            self.ema = None
        self.state["prediction_type"] = self.cfg.prediction_type

    def save(self) -> None:
        save_sharded(self.out, "vae", self.vae.state_dict())
        save_sharded(self.out, "oracle", self.oracle.state_dict())
        # raw weights in bf16 (resume restarts AdamW's moments); EMA in fp32: it is what gets shipped
        save_sharded(self.out, "diffusion", self._diffusion_params(), dtype=torch.bfloat16)
        save_sharded(self.out, "ema", self.ema)
        atomic_write_json(self.out / "state.json", self.state)

    def log(self, record: dict) -> None:
        record = {"time": round(time.time(), 1), **record}
        print(json.dumps(record), flush=True)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    # -- data ---------------------------------------------------------------------------------------------------
    def render_batch(self, n: int, styles=world.STYLES, exclude=True):
        s = world.sample_scenes(n, self.g, self.device, styles=styles, exclude_held_out_subjects=exclude)
        return s, world.render(s, self.g)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        ids = []
        for p in prompts:
            if p not in self._token_cache:
                self._token_cache[p] = self.tokenizer(p, padding="max_length", max_length=77,
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

    # -- phase 3: latent diffusion ------------------------------------------------------------------------------
    def train_unet(self, seconds: float) -> None:
        cfg = self.cfg
        from diffusers import DDPMScheduler

        sched = DDPMScheduler(**noise_schedule_config(cfg.prediction_type))
        alphas = sched.alphas_cumprod.to(self.device)
        self.unet.train().requires_grad_(True)
        self.text_encoder.train().requires_grad_(True)
        params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
        start, last_eval, step0 = time.time(), time.time(), self.state["unet_steps"]
        seconds_before = self.state["unet_seconds"]
        losses = []
        while time.time() - start < seconds or self.state["unet_steps"] == step0:  # at least one step per run
            step = self.state["unet_steps"]
            for group in opt.param_groups:  # warm-up after every (re)start: AdamW's moments start from zero
                group["lr"] = cfg.lr * min(1.0, (step - step0 + 1) / cfg.warmup_steps)
            s, images = self.render_batch(cfg.batch)
            prompts = world.prompts_for(s, self.g, cfg.drop_color, cfg.drop_pattern)
            drop = (torch.rand(len(prompts), generator=self.g, device=self.device) < cfg.cfg_dropout).tolist()
            prompts = ["" if d else p for p, d in zip(prompts, drop)]
            latents = self.to_latents(images)
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
            if time.time() - last_eval > cfg.eval_every_s:
                self.state["unet_seconds"] = seconds_before + time.time() - start
                self._log_progress(losses, start, step0)
                losses, last_eval = [], time.time()
        self.state["unet_seconds"] = seconds_before + time.time() - start
        self._log_progress(losses, start, step0)

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
    def pipeline(self):
        """A StableDiffusionPipeline holding copies of the EMA weights and the shipped scheduler."""
        from diffusers import StableDiffusionPipeline

        _, text_encoder, unet = build_models(self.tokenizer)
        unet.load_state_dict({k[5:]: v for k, v in self.ema.items() if k.startswith("unet.")})
        text_encoder.load_state_dict({k[13:]: v for k, v in self.ema.items() if k.startswith("text_encoder.")},
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


def eval_prompts(n: int, seed: int) -> tuple[list[str], world.Scenes]:
    """`n` fixed evaluation prompts: every style x ambiance x class x colour equally likely, no patterns."""
    g = torch.Generator().manual_seed(10_000 + seed)
    s = world.sample_scenes(n, g, styles=world.STYLES, solid_fraction=1.0)
    return world.prompts_for(s), s


@torch.no_grad()
def evaluate_pipeline(pipe, oracle, n, guidance_scale, steps, seed, device, autocast=None, batch=200):
    """Render `n` fixed prompts with `pipe` and return the oracle's recognition rate per named element."""
    prompts, s = eval_prompts(n, seed)
    images = []
    for i in range(0, n, batch):
        g = torch.Generator(device=device).manual_seed(seed + i)
        with autocast or torch.autocast("cpu", enabled=False):
            out = pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance_scale, generator=g,
                       output_type="pt")
        images.append(out.images.float())
    images = torch.cat(images)
    acc = oracle_mod.accuracy(oracle, images, s)
    hits = torch.stack([(oracle_mod.predict(oracle, images)[k].argmax(-1) == getattr(s, k).cpu())
                        for k in ("cls", "color", "style", "ambiance")])
    return {"cls": acc["cls"], "color": acc["color"], "style": acc["style"], "ambiance": acc["ambiance"],
            "all_four": float(hits.all(0).float().mean())}


def train_base(out: Path, device: str, minutes: float, resume: Path | None = None, cfg: TrainConfig = TrainConfig(),
               final_eval: int = 200, more_oracle_minutes: float = 0.0) -> dict:
    """Run the phases that are not done yet within `minutes`, save the checkpoint, and evaluate on `final_eval`
    prompts at several guidance scales. Returns the final evaluation."""
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    total = minutes * 60
    start = time.time()
    trainer = Trainer(out, device, cfg, resume)
    try:
        if not trainer.state["vae_done"]:
            trainer.train_vae(total * cfg.vae_fraction)
            trainer.save()
        if not trainer.state["oracle_done"] or more_oracle_minutes > 0:
            extra = more_oracle_minutes * 60 if trainer.state["oracle_done"] else total * cfg.oracle_fraction
            trainer.train_oracle(extra)
            trainer.save()
        remaining = total - (time.time() - start)
        trainer.train_unet(max(remaining, 0.0))
    except KeyboardInterrupt:
        # an interrupted phase is redone on resume; finished phases and the UNet's progress are kept
        trainer.save()
        raise Interrupted(f"training interrupted; checkpoint saved, continue with --resume {out}") from None
    trainer.save()
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


def export_pipeline(ckpt: Path, dest: Path, oracle_path: Path) -> None:
    """Write the shipped `builtin:toy` diffusers folder (fp16, EMA weights) and the oracle (fp16) from a checkpoint."""
    trainer = Trainer(ckpt, "cpu", TrainConfig(), ckpt)
    pipe = trainer.pipeline()
    pipe.to(torch.float16)
    dest.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(dest, safe_serialization=True)
    tok_mod.write_tokenizer_files(dest / "tokenizer")  # vocab.json + merges.txt too, for slow-tokenizer loaders
    atomic_save_safetensors(oracle_path, {k: v.half() if v.is_floating_point() else v
                                          for k, v in trainer.oracle.state_dict().items()})
    summary = {k: trainer.state.get(k) for k in ("unet_steps", "unet_samples", "unet_seconds", "scaling_factor",
                                                 "oracle_accuracy", "final_eval", "config")}
    atomic_write_text(dest / "training.json", json.dumps(summary, indent=2) + "\n")
