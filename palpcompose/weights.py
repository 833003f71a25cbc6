"""The trained weights of a project, as palpcompose stores them (final weights and every snapshot).

A weights folder (`out/weights/final/`, `out/snapshots/step-000100/`, ...) holds two small safetensors files:
- `lora.safetensors`: the UNet LoRA in peft's own key format, i.e. `peft.get_peft_model_state_dict(unet)`
  (keys such as `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`), fp32. A DoRA
  (`train.adapter = "dora"`, header `adapter: dora`) also holds each layer's magnitude vector, peft's
  `...to_q.lora_magnitude_vector` of shape (out_features,).
- `embeddings.safetensors`: one 1-D fp32 tensor per learned token, keyed by the token string (`<name-V1>`). SDXL:
  the token's embeddings in both text encoders end to end, [CLIP-L (768) | OpenCLIP-G (1280)], and the header's
  `text_encoder_dims` ("[768, 1280]") says where they split (`TrainedWeights.per_encoder`).
Both carry metadata in the safetensors header (format, tokens, rank, alpha, base model, step, the guidance mode that
trained them, palpcompose version), so a file found on its own still says what it is. `export.py` converts this
format to other tools' formats.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from palpcompose import __version__
from palpcompose.errors import DamagedFile, UserError
from palpcompose.fsutil import atomic_write_files, safetensors_bytes
from palpcompose.models.components import LORA_TARGET_MODULES

LORA_FILE = "lora.safetensors"
EMBEDDINGS_FILE = "embeddings.safetensors"


@dataclass
class TrainedWeights:
    lora: dict[str, torch.Tensor]  # peft key -> tensor
    embeddings: dict[str, torch.Tensor]  # token string -> (dim,)
    placeholders: dict[str, str]  # "V1" -> "<name-V1>"
    rank: int
    lora_alpha: float
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGET_MODULES))  # files without the key
    base_model: str = ""
    step: int = 0
    guidance: str = ""  # the guidance mode that trained them (palp, sds, none); "" in files older than the key
    text_encoder_dims: tuple[int, ...] = ()  # SDXL: (D1, D2), each embedding is [encoder 1 | encoder 2]; else ()
    encoder_keys: tuple[str, ...] = ()  # flow families: each part's encoder, ("clip_l", "t5") for Flux.1; else ()
    adapter: str = "lora"  # "dora": `lora` also holds peft's `...lora_magnitude_vector` (out_features,) per layer

    def per_encoder(self, token: str) -> list[torch.Tensor]:
        """The token's embedding in each text encoder: [vector] (SD 1/2) or SDXL's [clip_l, clip_g]."""
        vector = self.embeddings[token].reshape(-1)
        return list(vector.split(list(self.text_encoder_dims))) if self.text_encoder_dims else [vector]

    def metadata(self) -> dict[str, str]:
        extra = {"text_encoder_dims": json.dumps(list(self.text_encoder_dims))} if self.text_encoder_dims else {}
        if self.encoder_keys:
            extra["encoder_keys"] = json.dumps(list(self.encoder_keys))
        if self.adapter != "lora":  # LoRA files keep the header they always had
            extra["adapter"] = self.adapter
        return {
            **extra,
            "format": "palpcompose",
            "palpcompose_version": __version__,
            "placeholders": json.dumps(self.placeholders, sort_keys=True),
            "rank": str(self.rank),
            "lora_alpha": str(self.lora_alpha),
            "target_modules": json.dumps(self.target_modules),
            "base_model": self.base_model,
            "step": str(self.step),
            "guidance": self.guidance,
        }


def save_trained_weights(folder: str | Path, weights: TrainedWeights) -> None:
    """Write both files all or nothing (a full disk leaves neither, nor a folder this call created)."""
    folder = Path(folder)
    meta = weights.metadata()
    atomic_write_files({
        folder / LORA_FILE: safetensors_bytes({k: v.float() for k, v in weights.lora.items()}, meta),
        folder / EMBEDDINGS_FILE: safetensors_bytes({k: v.float() for k, v in weights.embeddings.items()}, meta),
    })


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors and header metadata; DamagedFile when it is truncated or its header is bad."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise DamagedFile(path, str(exc)) from None


def load_trained_weights(folder: str | Path) -> TrainedWeights:
    """A weights folder (final weights, a snapshot, a checkpoint's weights). DamagedFile names the damaged file
    (outputs.load_weights adds, for out/weights/final and out/snapshots, what to use instead)."""
    folder = Path(folder)
    lora_path, emb_path = folder / LORA_FILE, folder / EMBEDDINGS_FILE
    for p in (lora_path, emb_path):
        if not p.is_file():
            raise UserError(f"{p}: trained weights not found (run `palpcompose train` first)")
    lora, meta = read_safetensors(lora_path)
    embeddings, _ = read_safetensors(emb_path)
    if meta.get("format") != "palpcompose":
        raise UserError(f"{lora_path}: not a palpcompose weights file (no 'format: palpcompose' in its header)")
    try:
        return TrainedWeights(
            lora=lora, embeddings=embeddings, placeholders=json.loads(meta["placeholders"]),
            rank=int(meta["rank"]), lora_alpha=float(meta["lora_alpha"]),
            target_modules=json.loads(meta["target_modules"]), base_model=meta.get("base_model", ""),
            step=int(meta.get("step", "0")), guidance=meta.get("guidance", ""),
            text_encoder_dims=tuple(json.loads(meta.get("text_encoder_dims", "[]"))),
            encoder_keys=tuple(json.loads(meta.get("encoder_keys", "[]"))),
            adapter=meta.get("adapter", "lora"),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise DamagedFile(lora_path, f"bad header metadata: {type(exc).__name__}: {exc}") from None
