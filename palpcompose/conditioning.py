"""What the UNet reads of a prompt, for every model family: cross-attention embeddings, and for SDXL the pooled text
embedding and the six size values of its added conditioning.

SD 1.x / 2.x: one CLIP text encoder; the UNet reads its last hidden state (B, 77, D).
SDXL: two CLIP text encoders (CLIP ViT-L and OpenCLIP ViT-bigG); the UNet reads both penultimate hidden states side
by side (B, 77, 768 + 1280), and in `added_cond_kwargs` the second encoder's projected pooled embedding (B, 1280) with
`time_ids` (B, 6) = (original height, width, crop top, left, target height, width), as diffusers'
StableDiffusionXLPipeline computes them. `SDXLTextEncoders` makes the pair one module, so training code that calls
"the text encoder" needs no second branch; its input ids are (B, 2, 77), one row per tokenizer (models.tokenize).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Conditioning:
    """A batch of encoded prompts. `pooled` is None for SD 1.x / 2.x, (B, P) for SDXL."""

    embeds: torch.Tensor  # (B, 77, D)
    pooled: torch.Tensor | None = None

    def expand(self, batch: int) -> Conditioning:
        """A batch-1 conditioning repeated `batch` times (views, no copy)."""
        pooled = None if self.pooled is None else self.pooled.expand(batch, -1)
        return Conditioning(self.embeds.expand(batch, -1, -1), pooled)

    def detach(self) -> Conditioning:
        return Conditioning(self.embeds.detach(), None if self.pooled is None else self.pooled.detach())

    def zeros_like(self) -> Conditioning:
        """SDXL's `force_zeros_for_empty_prompt`: the empty prompt as zeros, as the SDXL sampler uses it."""
        return Conditioning(torch.zeros_like(self.embeds),
                            None if self.pooled is None else torch.zeros_like(self.pooled))

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        """Concatenate along the batch (for one batched unconditional + conditional pass)."""
        pooled = None if items[0].pooled is None else torch.cat([c.pooled for c in items])
        return Conditioning(torch.cat([c.embeds for c in items]), pooled)


def size_conditioning(resolution: int, width: int | None = None) -> torch.Tensor:
    """SDXL's time_ids (1, 6) for a square `resolution` image (or `resolution` high and `width` wide), uncropped:
    original size = target size. Square training images are resized and center-cropped to this size
    (data.resize_center_crop), and renders use the same values, which is what StableDiffusionXLPipeline passes by
    default. (Bucketed training images carry their own: data.encode_references.)"""
    width = resolution if width is None else width
    return torch.tensor([[resolution, width, 0, 0, resolution, width]], dtype=torch.float32)


class SDXLTextEncoders(torch.nn.Module):
    """SDXL's two text encoders as one module: ids (B, 2, 77) -> Conditioning(embeds (B, 77, D1 + D2), pooled)."""

    def __init__(self, text_encoder, text_encoder_2):
        super().__init__()
        self.text_encoder = text_encoder  # CLIPTextModel
        self.text_encoder_2 = text_encoder_2  # CLIPTextModelWithProjection

    @property
    def device(self) -> torch.device:
        return self.text_encoder.device

    def forward(self, input_ids: torch.Tensor) -> Conditioning:
        first = self.text_encoder(input_ids[:, 0], output_hidden_states=True)
        second = self.text_encoder_2(input_ids[:, 1], output_hidden_states=True)
        # penultimate layers, as StableDiffusionXLPipeline.encode_prompt (clip_skip None); pooled: the projection
        embeds = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return Conditioning(embeds, second.text_embeds)
