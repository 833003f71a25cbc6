"""The toy world's oracle: a small CNN that reads a 64x64 render's attributes, and the two metrics built on it.

Heads: class, colour, pattern, second colour (pattern colour), style (incl. the held-out style), ambiance.
It is trained on the generator's exact labels, half on clean renders and half on renders passed through the
`builtin:toy` VAE (so it also reads the slightly soft images a diffusion model decodes).

Metrics (per image, in [0, 1]):
- text alignment: the fraction of the prompt's named elements that the oracle recognises in the render. Elements are
  the style phrase ("a sketch of"), the ambiance phrase ("at night"), every object class ("star") and its colour
  when a colour word stands right before the class ("red star"). Only what the prompt names counts; a prompt without
  any style phrase names no style. The toy world draws one object per scene, so a prompt that names two different
  objects has at most all but one class (and its colour) recognised.
- subject fidelity: the subject's identity (class, colour, pattern, second colour) is read off the references (the
  oracle's mean probabilities, arg-max per head); a render's fidelity is the mean, over those four heads, of the
  probability the oracle gives the reference's value in the render. 1 = certainly the same object, ~0 = clearly not.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from palpcompose.errors import UserError
from palpcompose.toyworld import world

ORACLE_PATH = Path(__file__).parent / "oracle.safetensors"
HEADS = {
    "cls": world.CLASSES,
    "color": world.COLORS,
    "pattern": world.PATTERNS,
    "color2": world.COLORS2,
    "style": world.ALL_STYLES,
    "ambiance": world.AMBIANCES,
}
IDENTITY_HEADS = ("cls", "color", "pattern", "color2")


class Oracle(nn.Module):
    """Five stride-2 conv stages (64 -> 2 px), global average pooling, one linear head per attribute."""

    def __init__(self, width: int = 48):
        super().__init__()
        chans = [3, width, width * 2, width * 3, width * 4, width * 4]
        layers = []
        for cin, cout in itertools.pairwise(chans):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                       nn.Conv2d(cout, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({k: nn.Linear(chans[-1], len(v)) for k, v in HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (B, 3, 64, 64) in [0, 1] -> logits per head."""
        h = self.features(images * 2 - 1).mean((2, 3))
        return {k: head(h) for k, head in self.heads.items()}


def oracle_targets(s: world.Scenes) -> dict[str, torch.Tensor]:
    color2 = torch.where(s.pattern == 0, -100, s.color2)  # no second colour on solid objects
    return {"cls": s.cls, "color": s.color, "pattern": s.pattern, "color2": color2, "style": s.style,
            "ambiance": s.ambiance}


# A toy-world base model may carry the oracle that reads its decoder (tools/toyworld readout + export-base):
# FOLDER/oracle.safetensors, that model's instrument. Without one, the shipped oracle reads it.
MODEL_ORACLE_FILE = "oracle.safetensors"


def model_oracle_path(folder: str | Path) -> Path:
    """The oracle that scores a model folder: its own `oracle.safetensors` when it has one, else the shipped one
    (also for a hub id or anything that is not a folder)."""
    own = Path(folder) / MODEL_ORACLE_FILE
    return own if own.is_file() else ORACLE_PATH


def load_oracle(path: str | Path = ORACLE_PATH, device="cpu") -> Oracle:
    """The shipped oracle (fp16 safetensors), as an fp32 module in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"toy-world oracle weights not found at {path}; reinstall palpcompose")
    model = Oracle()
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.to(device).eval()


def to_batch(images) -> torch.Tensor:
    """PIL images, a list of (3, H, W) tensors or a (B, 3, H, W) tensor in [0, 1] -> (B, 3, 64, 64) float."""
    if isinstance(images, torch.Tensor):
        batch = images if images.dim() == 4 else images[None]
    else:
        import numpy as np

        tensors = []
        for im in images:
            if isinstance(im, torch.Tensor):
                tensors.append(im)
            else:
                arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
                tensors.append(torch.from_numpy(arr).permute(2, 0, 1))
        if not tensors:
            raise UserError("no images to score")
        size = tensors[0].shape[-2:]
        batch = torch.stack([t if t.shape[-2:] == size else F.interpolate(t[None], size=size)[0] for t in tensors])
    batch = batch.float()
    if batch.shape[-2:] != (world.SIZE, world.SIZE):
        batch = F.interpolate(batch, size=(world.SIZE, world.SIZE), mode="bilinear", antialias=True)
    return batch.clamp(0, 1)


@torch.no_grad()
def predict(oracle: Oracle, images) -> dict[str, torch.Tensor]:
    """Per-head probabilities (B, n_values) for a batch of images."""
    batch = to_batch(images).to(next(oracle.parameters()).device)
    return {k: v.softmax(-1).float().cpu() for k, v in oracle(batch).items()}


@dataclass(frozen=True)
class PromptElements:
    """The toy-world elements a prompt names (None where it names none)."""

    style: int | None
    ambiance: int | None
    cls: int | None
    color: int | None

    def named(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def parse_prompt(prompt: str) -> PromptElements:
    """The style, ambiance and first object class (with its colour) a prompt names; `prompt_elements` lists every
    object it names."""
    text = _normalise(prompt)
    style = next((i for i, s in enumerate(world.ALL_STYLES) if f" {world.STYLE_PHRASES[s]} " in text), None)
    ambiance = next((i for i, a in enumerate(world.AMBIANCES)
                     if world.AMBIANCE_PHRASES[a] and f" {world.AMBIANCE_PHRASES[a]}" in text), None)
    objects = _objects(text)
    cls, color = objects[0] if objects else (None, None)
    return PromptElements(style, ambiance, cls, color)


def _normalise(prompt: str) -> str:
    return " " + re.sub(r"\s+", " ", prompt.lower()) + " "


def _objects(text: str) -> list[tuple[int, int | None]]:
    """(class, colour or None) of every object class word in `text`, in the order they appear."""
    colors = "|".join(world.COLORS)
    found = []
    for m in re.finditer(rf"\b(?:({colors}) )?({'|'.join(world.CLASSES)})\b", text):
        found.append((world.CLASSES.index(m.group(2)), world.COLORS.index(m.group(1)) if m.group(1) else None))
    return found


def prompt_elements(prompt: str) -> list[tuple[str, int]]:
    """Every (head, value) a prompt names, each once: its style, its ambiance, and for EVERY object class it names
    the class and the colour named right before it. The toy world draws one object per scene, so a prompt naming
    two different objects can never have all its elements recognised: text alignment says so instead of scoring
    whichever class word came last."""
    named = parse_prompt(prompt)
    elements = [("style", named.style), ("ambiance", named.ambiance)]
    for cls, color in _objects(_normalise(prompt)):
        elements += [("cls", cls), ("color", color)]
    return list(dict.fromkeys((head, value) for head, value in elements if value is not None))


def score_text_alignment(images, prompt: str, oracle: Oracle | None = None) -> list[float]:
    """Per image: the fraction of the prompt's named elements (`prompt_elements`) recognised."""
    elements = prompt_elements(prompt)
    if not elements:
        raise UserError(
            f"prompt {prompt!r} names no toy-world element (style phrases: "
            f"{', '.join(world.STYLE_PHRASES.values())}; ambiances, classes, colours: see "
            "`python -m palpcompose.toyworld vocab`), so text alignment cannot be measured"
        )
    probs = predict(oracle or load_oracle(), images)
    hits = torch.stack([(probs[k].argmax(-1) == v).float() for k, v in elements])
    return hits.mean(0).tolist()


def subject_identity(oracle: Oracle, reference_images) -> dict[str, int]:
    """The subject's class, colour, pattern and second colour as read from its references."""
    probs = predict(oracle, reference_images)
    return {k: int(probs[k].mean(0).argmax()) for k in IDENTITY_HEADS}


def score_subject_fidelity(images, reference_images, oracle: Oracle | None = None) -> list[float]:
    """Per image: mean over the identity heads of the probability of the references' value (see module doc)."""
    oracle = oracle or load_oracle()
    identity = subject_identity(oracle, reference_images)
    probs = predict(oracle, images)
    per_head = torch.stack([probs[k][:, v] for k, v in identity.items()])
    return per_head.mean(0).tolist()


def accuracy(oracle: Oracle, images: torch.Tensor, s: world.Scenes) -> dict[str, float]:
    """Held-out accuracy per head on rendered scenes (second colour only on patterned objects)."""
    probs = predict(oracle, images)
    out = {}
    for k, target in oracle_targets(s).items():
        target = target.cpu()
        keep = target >= 0
        out[k] = float((probs[k].argmax(-1)[keep] == target[keep]).float().mean())
    return out


def accuracy_by_style(oracle: Oracle, images: torch.Tensor, s: world.Scenes, batch: int = 256) -> dict:
    """Held-out accuracy per head, over every style in the batch ("all_styles") and per style (second colour only on
    patterned objects); the report of `python -m palpcompose.toyworld oracle-accuracy`. Scored `batch` images at a
    time."""
    read = {k: torch.cat([predict(oracle, images[i:i + batch])[k].argmax(-1) for i in range(0, len(images), batch)])
            for k in HEADS}
    style = s.style.cpu()
    report = {}
    for head, target in oracle_targets(s).items():
        target = target.cpu()
        ok, keep = read[head] == target, target >= 0
        report[head] = {"all_styles": round(float(ok[keep].float().mean()), 4)}
        for i, name in enumerate(world.ALL_STYLES):
            sel = keep & (style == i)
            if sel.any():
                report[head][name] = round(float(ok[sel].float().mean()), 4)
    return report
