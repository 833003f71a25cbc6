"""What the rectified-flow families (flux.py, sd3.py) share: their text encoders as one module that tokenizes and
encodes a prompt for every encoder at once (`FlowTextEncoders`), the Flux latent packing, and the training noise
levels read from the model's own scheduler config (docs/method.md "Noise levels, for both terms").

Token ids of a prompt are one row per prompt with every encoder's ids end to end ([CLIP-L 77 | T5 512] for Flux.1),
so a batch of them stacks as SD's do; `FlowTextEncoders.forward` splits them again.

An encoder that holds no learned token (T5 with `train.t5_tokens = false`) has nothing to train: `cache_idle`
encodes once every prompt the run will give it, on the training device as the step would, and then moves it to the
CPU; from then on a `CachedEncoder` stands in for it and serves those encodings (docs/flow-memory.md).

A T5 that holds a learned token, under `train.recomputes_activations`, recomputes its blocks' activations in backward
(`recompute_t5_blocks`) instead of keeping them, as the transformer does.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from palpcompose.flow_guidance import (
    flux_mu,
    logit_normal_from_uniform,
    packed_seq_len,
    shift_sigmas,
    time_shift,
)


class FlowTextEncoders(torch.nn.Module):
    """A flow family's text encoders as one module: ids (B, sum of lengths) -> the family's Conditioning.

    `slots` are the family's EncoderSlots; `encode(encoders, ids per encoder)` its prompt encoding. An encoder that
    holds no learned token (`train.t5_tokens = false`: T5 reads the class word) gets its prompt with each token
    replaced by its subject's class word (`substitutions`)."""

    def __init__(self, slots, encoders, tokenizers, encode):
        super().__init__()
        self.slots = tuple(slots)
        self.encoders = torch.nn.ModuleList(encoders)
        self.tokenizers = list(tokenizers)
        self.encode = encode
        self.with_tokens = [True] * len(self.slots)  # which encoders hold a learned row per subject
        self.substitutions: dict[str, str] = {}  # token -> class word, in the encoders without tokens
        self.caches: list[CachedEncoder | None] = [None] * len(self.slots)  # set by cache_idle (a plain list:
        # the stand-ins are no submodules, so .to(), state_dict and DDP see only the real encoders)

    @property
    def device(self) -> torch.device:
        """Where the prompts are encoded: the device of the first encoder still in use (CLIP-L)."""
        live = [e for e, cache in zip(self.encoders, self.caches) if cache is None] or list(self.encoders)
        return next(live[0].parameters()).device

    @property
    def in_use(self) -> list:
        """What reads each encoder's part of the prompt: the encoder itself, or its CachedEncoder once it has left
        the device (previews hand these to the family's pipeline)."""
        return [e if cache is None else cache for e, cache in zip(self.encoders, self.caches)]

    @property
    def lengths(self) -> list[int]:
        return [slot.max_length for slot in self.slots]

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """(B, sum of lengths): each encoder's ids, padded and truncated to its length, end to end."""
        rows = []
        for slot, tokenizer, holds in zip(self.slots, self.tokenizers, self.with_tokens, strict=True):
            texts = prompts if holds else [_substitute(p, self.substitutions) for p in prompts]
            rows.append(tokenizer(texts, padding="max_length", max_length=slot.max_length, truncation=True,
                                  return_tensors="pt").input_ids)
        return torch.cat(rows, dim=-1)

    def forward(self, input_ids: torch.Tensor):
        parts = input_ids.to(self.device).split(self.lengths, dim=-1)
        return self.encode(self.in_use, list(parts))

    def cache_idle(self, input_ids: torch.Tensor, autocast) -> list[str]:
        """The encoders without a learned token: encode each distinct prompt of `input_ids` (rows as `tokenize`
        makes them) once, one prompt at a time, without gradients and under `autocast` (the step's), where they
        are now (the training device); keep what they returned, in host memory; move them to the CPU. The family's
        own `encode` makes the calls, so the cache holds exactly the calls the step makes. Returns the keys of the
        encoders moved ([] when every encoder holds a token)."""
        idle = [i for i, holds in enumerate(self.with_tokens) if not holds and self.caches[i] is None]
        if not idle:
            return []
        device = self.device
        for i in idle:
            self.caches[i] = CachedEncoder(self.encoders[i], device)
        with torch.no_grad(), autocast:
            for row in torch.unique(input_ids, dim=0):
                self(row[None])
        for i in idle:
            self.caches[i].recording = False
            self.encoders[i].to("cpu")
        return [self.slots[i].key for i in idle]


class CachedEncoder(torch.nn.Module):
    """A text encoder's outputs for the prompts it was given while `recording`, served in its place: called as the
    encoder is (`ids (B, L)`, keywords), it returns the same output class with each prompt's recorded tensors, on
    `device`. A prompt it has not seen (after recording) is encoded by the encoder where it now is (the CPU) and
    the result moved to `device`. No parameters and no submodules (the encoder is held outside the module tree), so
    a diffusers pipeline given it as its text encoder runs the prompt's encoding through it."""

    def __init__(self, encoder, device: torch.device):
        super().__init__()
        self._encoder = [encoder]  # a list: not a submodule
        self._device = torch.device(device)
        self._dtype = encoder.dtype
        self.outputs: dict[tuple, object] = {}  # (ids, keywords) -> the encoder's output for that one prompt
        self.recording = True

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def encoder(self):
        return self._encoder[0]

    def forward(self, input_ids: torch.Tensor, **kwargs):
        extra = tuple(sorted(kwargs.items()))
        keys = [(tuple(row.tolist()), extra) for row in input_ids]
        if self.recording:  # the encoder is still on the device: one prompt at a time, as it will be served
            for key, row in zip(keys, input_ids):
                if key not in self.outputs:
                    self.outputs[key] = _to_device(self.encoder(row[None].to(self._device), **kwargs), "cpu")
        if not all(key in self.outputs for key in keys):
            home = next(self.encoder.parameters()).device
            return _to_device(self.encoder(input_ids.to(home), **kwargs), self._device)
        return _concat([self.outputs[key] for key in keys], self._device)


def recompute_t5_blocks(t5) -> int:
    """Gradient checkpointing of a T5 encoder that trains a token, left in eval mode: each block's forward runs under
    torch.utils.checkpoint (non-reentrant), so backward keeps each block's inputs and recomputes one block's
    activations at a time (T5-XXL at 512 tokens with 8-bit linears: 0.34 GiB kept instead of 2.2, docs/flow-memory.md
    "T5's blocks recomputed"). transformers' own `gradient_checkpointing_enable()` acts only in training mode, which
    would switch T5's dropout on (rate 0.1); in eval mode the recomputation is the same computation again, so the
    gradients are those of the plain forward. The block's forward is wrapped, not its call: module hooks run once.
    Without gradients (the fixed prompts, previews) the blocks run as they are. Returns how many blocks."""
    blocks = t5.encoder.block  # T5EncoderModel -> T5Stack -> its T5Blocks
    for block in blocks:
        block.forward = functools.partial(_checkpointed_forward, block)
    return len(blocks)


def _checkpointed_forward(block, *args, **kwargs):
    forward = type(block).forward  # the class's forward (the instance's is this wrapper)
    if not torch.is_grad_enabled():
        return forward(block, *args, **kwargs)
    return checkpoint(forward, block, *args, use_reentrant=False, **kwargs)


def _to_device(output, device):
    """A transformers model output (or tensor) with every tensor in it moved to `device`."""
    if isinstance(output, torch.Tensor):
        return output.detach().to(device)
    if isinstance(output, tuple):  # (a ModelOutput is a dict)
        return tuple(_to_device(v, device) for v in output)
    return type(output)(**{k: _to_device(v, device) for k, v in output.items()})


def _concat(outputs: list, device):
    """Batch-1 outputs of the same class stacked along the batch, on `device`."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs).to(device)
    if isinstance(first, tuple):
        return tuple(_concat(list(parts), device) for parts in zip(*outputs))
    return type(first)(**{k: _concat([o[k] for o in outputs], device) for k in first})


def _substitute(prompt: str, words: dict[str, str]) -> str:
    for token, word in words.items():
        prompt = prompt.replace(token, word)
    return prompt


# --- Flux's 2x2 latent packing (FluxPipeline._pack_latents and its inverse) --------------------------------------


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): 2x2 patches as tokens, as FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of pack_latents: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    b, _, features = tokens.shape
    c = features // 4
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def latent_image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Flux's image position ids (h/2 * w/2, 3): (0, row, column) per packed token."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


# --- training noise levels -----------------------------------------------------------------------------------------


def training_sigmas(timesteps: torch.Tensor, num_train_timesteps: int, scheduler_config: dict,
                    latent_hw: tuple[int, int]) -> torch.Tensor:
    """The noise levels s (B,) of a batch from its uniform integer draws t ~ U[0, T) (data.sample_batch): u = (t +
    0.5) / T through the logit-normal density's inverse CDF (flow_guidance.logit_normal_from_uniform), then the
    family's shift from its scheduler config: Flux's resolution-dependent one (`use_dynamic_shifting`: mu from the
    number of image tokens), SD 3's static `shift`. Clamped to [1/T, 1] as flow_guidance.sample_sigmas."""
    u = (timesteps.double() + 0.5) / num_train_timesteps
    u = logit_normal_from_uniform(u).float()
    if scheduler_config.get("use_dynamic_shifting"):
        mu = flux_mu(packed_seq_len(*latent_hw), scheduler_config.get("base_image_seq_len", 256),
                     scheduler_config.get("max_image_seq_len", 4096), scheduler_config.get("base_shift", 0.5),
                     scheduler_config.get("max_shift", 1.15))
        sigmas = time_shift(u, mu)
    else:
        sigmas = shift_sigmas(u, float(scheduler_config.get("shift", 1.0)))
    return sigmas.clamp(1.0 / num_train_timesteps, 1.0)
