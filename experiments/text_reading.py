"""How a toy model's UNet reads its prompt (docs/toyworld.md, "Where the pattern is lost" and v2d's figures).

    python -m experiments.text_reading FOLDER [FOLDER ...]     (builtin:toy: palpcompose/builtin/toy)

(1) The text encoder: for `a photo of a blue circle with black stripes` and five prompts that change one word, the
distance between the encoder's output states at the changed word and, averaged, over the padding positions (after
the end token). (2) The UNet's cross-attention on that prompt (8 noise latents, t = 800 / 500 / 200, averaged over
layers, heads and pixels): the pattern word's share, the padding's share and the entropy, each beside its uniform
value.
"""

from __future__ import annotations

import math
import sys

import torch

BASE = "a photo of a blue circle with black stripes"
CHANGED = (("a photo of a blue circle with black checks", "stripes->checks"),
           ("a photo of a blue circle with black dots", "stripes->dots"),
           ("a photo of a red circle with black stripes", "colour"),
           ("a photo of a blue square with black stripes", "class"),
           ("a photo of a blue circle with white stripes", "second colour"))
PATTERN_POSITION, PADDING_FROM = 9, 11  # start token, 8 words, the pattern word, the end token


@torch.no_grad()
def encoder_distances(pipe) -> dict:
    tok = pipe.tokenizer

    def states(p):
        ids = tok(p, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        return pipe.text_encoder(ids)[0][0]

    base = states(BASE)
    out = {}
    for prompt, what in CHANGED:
        d = (states(prompt) - base).norm(dim=-1)
        out[what] = {"max_over_words": round(float(d[:PADDING_FROM].max()), 2),
                     "padding_mean": round(float(d[PADDING_FROM - 1:].mean()), 2)}
    return out


@torch.no_grad()
def cross_attention(pipe) -> dict:
    tok, L = pipe.tokenizer, pipe.tokenizer.model_max_length
    ids = tok([BASE] * 8, padding="max_length", max_length=L, return_tensors="pt").input_ids
    enc = pipe.text_encoder(ids)[0]
    rows = []

    def hook(mod, args, kwargs, out):
        q, k, heads = mod.to_q(args[0]), mod.to_k(kwargs["encoder_hidden_states"]), mod.heads
        b, n, c = q.shape
        a = (q.view(b, n, heads, c // heads).transpose(1, 2)
             @ k.view(b, -1, heads, c // heads).transpose(1, 2).transpose(-1, -2) * mod.scale).softmax(-1)
        share = a.mean(dim=(0, 1, 2))
        rows.append((float(share[PATTERN_POSITION]), float(share[PADDING_FROM:].sum()),
                     float(-(a * a.clamp_min(1e-12).log()).sum(-1).mean())))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for n, m in pipe.unet.named_modules()
               if n.endswith("attn2")]
    g = torch.Generator().manual_seed(0)
    out = {}
    for t in (800, 500, 200):
        rows.clear()
        pipe.unet(torch.randn(8, 4, 16, 16, generator=g), torch.full((8,), t), enc)
        out[t] = {k: round(sum(r[i] for r in rows) / len(rows), 3) for i, k in
                  enumerate(("pattern_word_share", "padding_share", "entropy"))}
    for h in handles:
        h.remove()
    out["uniform"] = {"pattern_word_share": round(1 / L, 3), "padding_share": round((L - PADDING_FROM) / L, 2),
                      "entropy": round(math.log(L), 2)}
    return out


def main(folders: list[str]) -> None:
    from diffusers import StableDiffusionPipeline

    for folder in folders:
        pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None)
        print(folder, {"encoder": encoder_distances(pipe), "cross_attention": cross_attention(pipe)})


if __name__ == "__main__":
    main(sys.argv[1:])
