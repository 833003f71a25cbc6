"""The toy world: a procedural 64x64 RGB renderer and the English prompts that describe its scenes.

A scene is a structured description (object class, colour, surface pattern with a second colour, style, ambiance)
plus a random layout (position, scale, rotation, pattern frequency and angle, where the stars, sun and bubbles go).
Everything is vectorised torch on a coordinate grid, batch dimension first, and every random number comes from a
`torch.Generator`, so the same code renders a few reference images on a CPU and millions per minute on a GPU, and a
seed always gives the same pixels.

Each attribute is made to be unmistakable at 64 px: shapes are signed-distance fields filling a good part of the
frame, styles change how the whole picture is drawn (the background too), and ambiances change the whole palette and
add their own global cues (moon and stars, a low sun, falling snow, caustics and bubbles).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SIZE = 64
# The object's radius as a fraction of the half-frame (v1's world; a world may draw larger objects, whose pattern,
# drawn in object units, grows with them: docs/toyworld.md, "v2b").
OBJECT_SCALE = (0.30, 0.50)
# A pattern's frequency (periods per object radius) and angle (radians, in the object's frame): v1's ranges. A world
# may fix them (v2c: docs/toyworld.md), so that a pattern word names one texture rather than a family of them.
PATTERN_FREQ = (1.8, 2.6)
PATTERN_ANGLE = (-0.6, 0.6)

CLASSES = ("circle", "square", "triangle", "star", "cross", "heart")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple")
# The second colour of a pattern may also be white or black.
COLORS2 = COLORS + ("white", "black")
PATTERNS = ("solid", "stripes", "dots", "checks")
# Styles the base model is trained on; "pixel art" exists in the world but is held out of base training, so a demo
# can teach it as an unseen artistic style.
STYLES = ("photo", "sketch", "pop art", "watercolor")
HELD_OUT_STYLES = ("pixel art",)
ALL_STYLES = STYLES + HELD_OUT_STYLES
# "day" is the plain ambiance: prompts say nothing about it.
AMBIANCES = ("day", "night", "sunset", "snow", "underwater")

STYLE_PHRASES = {
    "photo": "a photo of",
    "sketch": "a sketch of",
    "pop art": "a pop art painting of",
    "watercolor": "a watercolor painting of",
    "pixel art": "a pixel art picture of",
}
AMBIANCE_PHRASES = {"day": "", "night": "at night", "sunset": "at sunset", "snow": "in the snow",
                    "underwater": "underwater"}
PATTERN_WORDS = {"stripes": "stripes", "dots": "dots", "checks": "checks"}

RGB = {
    "red": (0.88, 0.10, 0.12),
    "orange": (1.00, 0.52, 0.05),
    "yellow": (0.98, 0.90, 0.10),
    "green": (0.10, 0.70, 0.20),
    "blue": (0.12, 0.30, 0.95),
    "purple": (0.58, 0.15, 0.75),
    "white": (0.97, 0.97, 0.97),
    "black": (0.05, 0.05, 0.05),
}

# Subjects drawn from these seeds are held out: base-model training data never contains their
# (class, colour, pattern, second colour) combination. Tests and docs use only these seeds.
HELD_OUT_SUBJECT_SEEDS = range(64)


def _rgb_table(names, device) -> torch.Tensor:
    return torch.tensor([RGB[n] for n in names], device=device)


# ----------------------------------------------------------------------------------------------------------------
# Scene descriptions
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenes:
    """A batch of scene descriptions and layouts: every field is a tensor with the batch dimension first."""

    cls: torch.Tensor  # (B,) index into CLASSES
    color: torch.Tensor  # (B,) index into COLORS
    pattern: torch.Tensor  # (B,) index into PATTERNS
    color2: torch.Tensor  # (B,) index into COLORS2 (unused when pattern is solid)
    style: torch.Tensor  # (B,) index into ALL_STYLES
    ambiance: torch.Tensor  # (B,) index into AMBIANCES
    center: torch.Tensor  # (B, 2) object centre in [-1, 1] image units, y up
    scale: torch.Tensor  # (B,) object radius in image units (1 = half the image)
    angle: torch.Tensor  # (B,) object rotation, radians
    pattern_freq: torch.Tensor  # (B,) pattern periods per object radius
    pattern_angle: torch.Tensor  # (B,) pattern rotation, radians
    horizon: torch.Tensor  # (B,) height of the horizon line (y, image units)
    points: torch.Tensor  # (B, K, 2) random points for stars, snowflakes and bubbles
    noise_seed: torch.Tensor  # (B, 1, 8, 8) low-frequency noise (watercolour blotches)

    def __len__(self) -> int:
        return self.cls.shape[0]

    def to(self, device) -> Scenes:
        return Scenes(**{k: v.to(device) for k, v in self.__dict__.items()})


def _uniform(n, lo, hi, g, device, shape=()):
    return lo + (hi - lo) * torch.rand((n, *shape), generator=g, device=device)


def _combo_id(cls, color, pattern, color2):
    return ((cls * len(COLORS) + color) * len(PATTERNS) + pattern) * len(COLORS2) + color2


@functools.lru_cache(maxsize=4)
def _held_out_table_cpu(color2_choices: tuple[str, ...] | None = None) -> torch.Tensor:
    table = torch.zeros(len(CLASSES) * len(COLORS) * len(PATTERNS) * len(COLORS2), dtype=torch.bool)
    for seed in HELD_OUT_SUBJECT_SEEDS:
        s = subject_from_seed(seed, color2_choices)
        table[_combo_id(s.cls, s.color, s.pattern, s.color2)] = True
    return table


def _held_out_table(device, color2_choices: tuple[str, ...] | None = None) -> torch.Tensor:
    return _held_out_table_cpu(color2_choices).to(device)


def check_color2_choices(color2_choices) -> tuple[str, ...] | None:
    """None (v1: any colour but the main one, or white or black) or a tuple of second colours that are never main
    colours (e.g. ("white", "black")), so that a colour word always says which of the two colours it is."""
    if color2_choices is None:
        return None
    choices = tuple(color2_choices)
    bad = [c for c in choices if c not in COLORS2 or c in COLORS]
    if not choices or bad:
        raise ValueError(f"color2_choices must be second colours that are no main colour "
                         f"({', '.join(c for c in COLORS2 if c not in COLORS)}); got {choices}")
    return choices


def sample_layout(n: int, g: torch.Generator, device="cpu", object_scale: tuple[float, float] = OBJECT_SCALE,
                  pattern_freq: tuple[float, float] = PATTERN_FREQ,
                  pattern_angle: tuple[float, float] = PATTERN_ANGLE) -> dict[str, torch.Tensor]:
    """Random placement, scale, rotation and background details for `n` scenes. `object_scale`: the range of the
    object's radius as a fraction of the half-frame (the pattern, in object units, scales with it);
    `pattern_freq`, `pattern_angle`: the ranges of the pattern's frequency and angle (equal ends fix them; the
    generator's draws are the same either way)."""
    scale = _uniform(n, *object_scale, g, device)
    limit = 0.92 - scale
    center = (torch.rand((n, 2), generator=g, device=device) * 2 - 1) * limit[:, None]
    return {
        "center": center,
        "scale": scale,
        "angle": _uniform(n, -0.3, 0.3, g, device),
        "pattern_freq": _uniform(n, *pattern_freq, g, device),
        "pattern_angle": _uniform(n, *pattern_angle, g, device),
        "horizon": _uniform(n, -0.55, -0.25, g, device),
        "points": torch.rand((n, 24, 2), generator=g, device=device) * 2 - 1,
        "noise_seed": torch.rand((n, 1, 8, 8), generator=g, device=device),
    }


def sample_scenes(
    n: int,
    g: torch.Generator,
    device="cpu",
    styles=STYLES,
    exclude_held_out_subjects: bool = True,
    solid_fraction: float = 0.4,
    color2_choices: tuple[str, ...] | None = None,
    object_scale: tuple[float, float] = OBJECT_SCALE,
    pattern_freq: tuple[float, float] = PATTERN_FREQ,
    pattern_angle: tuple[float, float] = PATTERN_ANGLE,
) -> Scenes:
    """Random scenes. `styles` restricts the styles used (names); by default the held-out subjects' combinations are
    replaced by solid objects, so a base model trained on these scenes never sees a held-out subject.
    `color2_choices` (None: v1's world) restricts second colours, e.g. to ("white", "black") (`check_color2_choices`);
    held-out subjects are then those `subject_from_seed(seed, color2_choices)` gives. `object_scale` as in
    `sample_layout`, and `pattern_freq`, `pattern_angle`."""
    color2_choices = check_color2_choices(color2_choices)
    style_ids = torch.tensor([ALL_STYLES.index(s) for s in styles], device=device)
    cls = torch.randint(len(CLASSES), (n,), generator=g, device=device)
    color = torch.randint(len(COLORS), (n,), generator=g, device=device)
    pattern = torch.randint(1, len(PATTERNS), (n,), generator=g, device=device)
    pattern = torch.where(torch.rand(n, generator=g, device=device) < solid_fraction, 0, pattern)
    # second colour: any colour but the first (white and black always allowed)
    if color2_choices is None:
        offset = torch.randint(1, len(COLORS2), (n,), generator=g, device=device)
        color2 = (color + offset) % len(COLORS2)
    else:
        ids = torch.tensor([COLORS2.index(c) for c in color2_choices], device=device)
        color2 = ids[torch.randint(len(ids), (n,), generator=g, device=device)]
    style = style_ids[torch.randint(len(style_ids), (n,), generator=g, device=device)]
    ambiance = torch.randint(len(AMBIANCES), (n,), generator=g, device=device)
    if exclude_held_out_subjects:
        held = _held_out_table(device, color2_choices)[_combo_id(cls, color, pattern, color2)]
        pattern = torch.where(held, 0, pattern)
    return Scenes(cls=cls, color=color, pattern=pattern, color2=color2, style=style, ambiance=ambiance,
                  **sample_layout(n, g, device, object_scale, pattern_freq, pattern_angle))


# ----------------------------------------------------------------------------------------------------------------
# Personal subjects
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Subject:
    """A personal object: one class with one particular two-colour pattern (and its own pattern frequency/angle)."""

    seed: int
    cls: int
    color: int
    pattern: int
    color2: int
    pattern_freq: float
    pattern_angle: float

    @property
    def class_name(self) -> str:
        return CLASSES[self.cls]

    def describe(self) -> dict:
        return {
            "seed": self.seed,
            "class_name": CLASSES[self.cls],
            "color": COLORS[self.color],
            "pattern": PATTERNS[self.pattern],
            "color2": COLORS2[self.color2],
            "description": f"a {COLORS[self.color]} {CLASSES[self.cls]} with {COLORS2[self.color2]} "
            f"{PATTERN_WORDS[PATTERNS[self.pattern]]}",
            "held_out": self.seed in HELD_OUT_SUBJECT_SEEDS,
        }


def subject_from_seed(seed: int, color2_choices: tuple[str, ...] | None = None,
                      pattern_freq: tuple[float, float] = PATTERN_FREQ,
                      pattern_angle: tuple[float, float] = PATTERN_ANGLE) -> Subject:
    """The subject a seed stands for. Always patterned (two colours), so it is an instance, not a class.
    `color2_choices` as in `sample_scenes` (None: v1's world); `pattern_freq`, `pattern_angle`: the ranges its own
    pattern frequency and angle are drawn from (a seed keeps its class, colours and pattern in every world)."""
    color2_choices = check_color2_choices(color2_choices)
    g = torch.Generator().manual_seed(10_007 * int(seed) + 17)
    cls = int(torch.randint(len(CLASSES), (1,), generator=g))
    color = int(torch.randint(len(COLORS), (1,), generator=g))
    pattern = int(torch.randint(1, len(PATTERNS), (1,), generator=g))
    if color2_choices is None:
        color2 = (color + int(torch.randint(1, len(COLORS2), (1,), generator=g))) % len(COLORS2)
    else:
        color2 = COLORS2.index(color2_choices[int(torch.randint(len(color2_choices), (1,), generator=g))])
    u_freq, u_angle = float(torch.rand(1, generator=g)), float(torch.rand(1, generator=g))
    # v1's own expressions for v1's ranges, so v1's subjects keep their exact floats (the golden tests)
    freq = 1.8 + 0.8 * u_freq if pattern_freq == PATTERN_FREQ else \
        pattern_freq[0] + (pattern_freq[1] - pattern_freq[0]) * u_freq
    angle = -0.6 + 1.2 * u_angle if pattern_angle == PATTERN_ANGLE else \
        pattern_angle[0] + (pattern_angle[1] - pattern_angle[0]) * u_angle
    return Subject(seed, cls, color, pattern, color2, freq, angle)


def subject_scenes(subject: Subject, n: int, g: torch.Generator, style="photo", ambiance="day", device="cpu",
                   object_scale: tuple[float, float] = OBJECT_SCALE) -> Scenes:
    """`n` scenes of `subject` at varied placements, in one style and ambiance (photo-like by default);
    `object_scale` as in `sample_layout`."""

    def full(v, dtype=torch.long):
        return torch.full((n,), v, dtype=dtype, device=device)

    layout = sample_layout(n, g, device, object_scale)
    layout["pattern_freq"] = full(subject.pattern_freq, torch.float32)
    layout["pattern_angle"] = full(subject.pattern_angle, torch.float32)
    return Scenes(cls=full(subject.cls), color=full(subject.color), pattern=full(subject.pattern),
                  color2=full(subject.color2), style=full(ALL_STYLES.index(style)),
                  ambiance=full(AMBIANCES.index(ambiance)), **layout)


# ----------------------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(cls: str, color: str | None = None, pattern: str = "solid", color2: str | None = None) -> str:
    """"a red star", "an orange heart with white dots", "a square"."""
    noun = f"{color} {cls}" if color else cls
    text = f"{_article(noun)} {noun}"
    if pattern != "solid" and color2:
        text += f" with {color2} {PATTERN_WORDS[pattern]}"
    return text


def compose_prompt(style: str, obj: str, ambiance: str = "day") -> str:
    """Style phrase before the object, ambiance phrase after it: "a sketch of a red star at night"."""
    parts = [STYLE_PHRASES[style], obj, AMBIANCE_PHRASES[ambiance]]
    return " ".join(p for p in parts if p)


def prompts_for(scenes: Scenes, g: torch.Generator | None = None, drop_color: float = 0.0, drop_pattern: float = 0.0):
    """The English prompt of each scene. With a generator, the colour / pattern words are sometimes left out (the
    picture still has them), so the model also learns prompts that do not name everything. `scenes` may be anything
    with the six attribute tensors (cls, color, pattern, color2, style, ambiance)."""
    n = scenes.cls.shape[0]
    keep_color = torch.ones(n, dtype=torch.bool)
    keep_pattern = torch.ones(n, dtype=torch.bool)
    if g is not None:
        keep_color = torch.rand(n, generator=g, device=g.device).cpu() >= drop_color
        keep_pattern = torch.rand(n, generator=g, device=g.device).cpu() >= drop_pattern
    rows = zip(*(t.tolist() for t in (scenes.cls, scenes.color, scenes.pattern, scenes.color2, scenes.style,
                                       scenes.ambiance)))
    out = []
    for i, (c, col, pat, col2, sty, amb) in enumerate(rows):
        obj = object_phrase(CLASSES[c], COLORS[col] if keep_color[i] else None,
                            PATTERNS[pat] if keep_pattern[i] else "solid", COLORS2[col2])
        out.append(compose_prompt(ALL_STYLES[sty], obj, AMBIANCES[amb]))
    return out


def vocab() -> dict:
    """The exact phrases prompts use, for `python -m palpcompose.toyworld vocab`."""
    return {
        "styles": [STYLE_PHRASES[s] for s in STYLES],
        "ambiances": [AMBIANCE_PHRASES[a] for a in AMBIANCES if AMBIANCE_PHRASES[a]],
        "classes": list(CLASSES),
        "colors": list(COLORS),
        "patterns": [f"with {{color}} {PATTERN_WORDS[p]}" for p in PATTERNS if p != "solid"],
        "held_out_styles": [STYLE_PHRASES[s] for s in HELD_OUT_STYLES],
        "example": compose_prompt("watercolor", object_phrase("star", "red"), "sunset"),
    }


# ----------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------


def _grid(device):
    lin = (torch.arange(SIZE, device=device, dtype=torch.float32) + 0.5) / SIZE * 2 - 1
    y, x = torch.meshgrid(-lin, lin, indexing="ij")  # y up
    return x[None], y[None]  # (1, H, W)


def _rotate(x, y, a):
    c, s = torch.cos(a)[:, None, None], torch.sin(a)[:, None, None]
    return c * x + s * y, -s * x + c * y


def _sd_box(x, y, bx, by):
    qx, qy = x.abs() - bx, y.abs() - by
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    return outside + torch.maximum(qx, qy).clamp(max=0)


def _sd_triangle(x, y, r=0.95):
    # equilateral triangle pointing up, circumradius-like size r
    k = math.sqrt(3.0)
    y = y + 0.25 * r
    px, py = x.abs() - r, y + r / k
    flip = px + k * py > 0
    px, py = torch.where(flip, (px - k * py) / 2, px), torch.where(flip, (-k * px - py) / 2, py)
    px = px - px.clamp(-2 * r, 0)
    return -torch.sqrt(px * px + py * py) * torch.sign(py)


def _sd_star(x, y):
    # five points: the boundary radius goes linearly from 0.42 (valleys) to 1.0 (tips) with the angle
    phi = torch.atan2(x, y)  # 0 at the top
    t = (phi / (2 * math.pi) * 5) % 1.0
    tip = 1 - 2 * torch.minimum(t, 1 - t)
    radius = 0.42 + 0.58 * tip
    return (torch.sqrt(x * x + y * y) - radius) * 0.6


def _sd_heart(x, y):
    # two lobes and a point: iq's heart on (0..1) coordinates, shifted and scaled to fill the unit disc
    px, py = x.abs() / 1.25, (y + 0.85) / 1.25
    upper = torch.sqrt((px - 0.25) ** 2 + (py - 0.75) ** 2) - math.sqrt(2) / 4
    m = 0.5 * (px + py).clamp(min=0)
    lower = torch.sqrt(torch.minimum(px ** 2 + (py - 1) ** 2, (px - m) ** 2 + (py - m) ** 2)) * torch.sign(px - py)
    return torch.where(py + px > 1, upper, lower) * 1.25


def shape_sdf(cls: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) of each scene's shape, in object units (radius 1), on local coordinates."""
    fields = torch.stack([
        torch.sqrt(x * x + y * y) - 0.92,
        _sd_box(x, y, 0.78, 0.78),
        _sd_triangle(x, y),
        _sd_star(x, y),
        torch.minimum(_sd_box(x, y, 0.95, 0.32), _sd_box(x, y, 0.32, 0.95)),
        _sd_heart(x, y),
    ])  # (C, B, H, W)
    return fields.gather(0, cls[None, :, None, None].expand(1, *x.shape)).squeeze(0)


def _pattern_mask(pattern, u, v, freq, angle):
    """1 where the second colour shows, per pattern (solid, stripes, dots, checks); soft edges."""
    a, b = _rotate(u, v, angle)
    f = freq[:, None, None]
    stripes = (torch.sin(math.pi * a * f) * 3 + 0.5).clamp(0, 1)
    ca, cb = torch.frac(a * f / 2 + 100) - 0.5, torch.frac(b * f / 2 + 100) - 0.5
    dots = ((0.3 - torch.sqrt(ca * ca + cb * cb)) * 12 + 0.5).clamp(0, 1)
    checks = (torch.sin(math.pi * a * f * 0.8) * torch.sin(math.pi * b * f * 0.8) * 4 + 0.5).clamp(0, 1)
    masks = torch.stack([torch.zeros_like(a), stripes, dots, checks])
    return masks.gather(0, pattern[None, :, None, None].expand(1, *a.shape)).squeeze(0)


def _blob(x, y, px, py, sigma):
    """Sum of small Gaussian spots at points (B, K); returns (B, H, W) in [0, 1]."""
    d2 = (x[:, None] - px[..., None, None]) ** 2 + (y[:, None] - py[..., None, None]) ** 2
    return torch.exp(-d2 / (2 * sigma * sigma)).sum(1).clamp(max=1)


def _mix(a, b, t):
    return a + (b - a) * t


def _select(options: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    stacked = torch.stack(options)  # (N, B, ...)
    return stacked[index, torch.arange(index.shape[0], device=index.device)]


def _ambiance_layers(s: Scenes, x, y):
    """Background colour (B, 3, H, W), object tint (B, 3), foreground overlay colour and alpha (snow), per ambiance."""
    B, dev = len(s), x.device
    xb, yb = x.expand(B, -1, -1), y.expand(B, -1, -1)
    h = s.horizon[:, None, None]
    sky_t = ((yb + 1) / 2)[:, None]  # 0 bottom .. 1 top
    ground = (yb < h).float()[:, None]
    px, py = s.points[..., 0], s.points[..., 1]

    def grad(top, bottom):
        top = torch.tensor(top, device=dev)[None, :, None, None]
        bottom = torch.tensor(bottom, device=dev)[None, :, None, None]
        return _mix(bottom, top, sky_t).expand(B, -1, -1, -1)

    def solid(rgb):
        return torch.tensor(rgb, device=dev)[None, :, None, None]

    # day: blue sky, green ground
    day = _mix(grad((0.45, 0.70, 1.00), (0.80, 0.90, 1.00)), solid((0.40, 0.72, 0.30)), ground)
    # night: dark blue, stars, a crescent moon top-left or top-right
    night = _mix(grad((0.02, 0.02, 0.10), (0.08, 0.10, 0.28)), solid((0.03, 0.05, 0.08)), ground)
    stars = _blob(xb, yb, px[:, :14], py[:, :14].abs() * 0.9 + 0.1, 0.022)[:, None]
    mx = torch.where(px[:, 14] > 0, 0.6, -0.6)[:, None, None]
    moon = ((xb - mx) ** 2 + (yb - 0.65) ** 2 < 0.03) & ((xb - mx - 0.08) ** 2 + (yb - 0.7) ** 2 > 0.025)
    night = _mix(night, solid((1.0, 1.0, 0.85)), torch.maximum(stars, moon.float()[:, None]))
    # sunset: purple to orange sky, a low sun on the horizon, a dark silhouette ground
    sunset = grad((0.40, 0.15, 0.45), (1.00, 0.55, 0.15))
    sx = px[:, 15][:, None, None] * 0.6
    sun = (((xb - sx) ** 2 + (yb - h) ** 2) < 0.09).float()[:, None]
    sunset = _mix(sunset, solid((1.0, 0.90, 0.35)), sun)
    sunset = _mix(sunset, solid((0.22, 0.08, 0.18)), ground)
    # snow: pale grey sky, white ground; flakes are drawn over everything (foreground)
    snow = _mix(grad((0.70, 0.74, 0.80), (0.88, 0.90, 0.94)), solid((0.98, 0.98, 1.0)), ground)
    flakes = _blob(xb, yb, px, py, 0.028)[:, None]
    # underwater: teal water, light caustics near the top, sand floor, bubble rings
    water = grad((0.05, 0.55, 0.65), (0.00, 0.22, 0.40))
    caustic = (torch.sin(9 * xb + 3 * torch.sin(6 * yb + 10 * px[:, :1, None])).clamp(min=0) ** 6
               * sky_t[:, 0]).unsqueeze(1)
    water = water + 0.35 * caustic
    water = _mix(water, solid((0.80, 0.72, 0.45)), ground)
    ring_d = torch.sqrt((xb[:, None] - px[:, 16:22, None, None]) ** 2 + (yb[:, None] - py[:, 16:22, None, None]) ** 2)
    rings = ((0.012 - (ring_d - 0.07).abs()) * 60 + 0.5).clamp(0, 1).amax(1)[:, None]
    underwater = _mix(water, solid((0.85, 0.97, 1.0)), rings)

    bg = _select([day, night, sunset, snow, underwater], s.ambiance)
    tints = torch.tensor([(1.0, 1.0, 1.0), (0.60, 0.65, 0.85), (1.0, 0.80, 0.65), (1.0, 1.0, 1.05), (0.70, 0.95, 1.0)],
                         device=dev)
    tint = tints[s.ambiance]
    fg_alpha = flakes * (s.ambiance == AMBIANCES.index("snow")).float()[:, None, None, None]
    return bg, tint, fg_alpha


def _blur(img, k=5):
    return F.avg_pool2d(F.pad(img, (k // 2,) * 4, mode="replicate"), k, stride=1)


def _posterize(img, levels=3):
    return torch.round(img.clamp(0, 1) * (levels - 1)) / (levels - 1)


def render(s: Scenes, g: torch.Generator) -> torch.Tensor:
    """Render scenes to images (B, 3, 64, 64), float in [0, 1], on the scenes' device. `g` adds grain and paper
    noise, so the same (scenes, generator seed) pair always gives the same pixels."""
    dev = s.cls.device
    B = len(s)
    x, y = _grid(dev)
    bg, tint, fg_alpha = _ambiance_layers(s, x, y)

    # object in local coordinates (radius 1) -> signed distance in pixels
    scale = s.scale[:, None, None]
    u, v = _rotate((x - s.center[:, 0, None, None]) / scale, (y - s.center[:, 1, None, None]) / scale, s.angle)
    d_px = shape_sdf(s.cls, u, v) * scale * (SIZE / 2)
    inside = (0.5 - d_px).clamp(0, 1)[:, None]
    pat = _pattern_mask(s.pattern, u, v, s.pattern_freq, s.pattern_angle)[:, None]
    c1 = _rgb_table(COLORS, dev)[s.color][:, :, None, None]
    c2 = _rgb_table(COLORS2, dev)[s.color2][:, :, None, None]
    albedo = _mix(c1, c2, pat) * tint[:, :, None, None]
    outline = ((1.8 - d_px.abs()) * 0.8).clamp(0, 1)[:, None]
    shade = (1.0 + 0.18 * (v - u) / 1.4).clamp(0.75, 1.2)[:, None]  # lit from the top left

    # shadow for the photo style: the shape shifted down-right
    su, sv = _rotate((x - s.center[:, 0, None, None] - 0.07) / scale, (y - s.center[:, 1, None, None] + 0.07) / scale,
                     s.angle)
    shadow = ((0.5 - shape_sdf(s.cls, su, sv) * scale * (SIZE / 2)) / 3).clamp(0, 1)[:, None]

    grain = torch.randn((B, 1, SIZE, SIZE), generator=g, device=dev)
    blotch = F.interpolate(s.noise_seed, size=(SIZE, SIZE), mode="bicubic", align_corners=False)
    white = torch.ones(1, 3, 1, 1, device=dev)
    black = torch.zeros(1, 3, 1, 1, device=dev)
    xg, yg = x[:, None], y[:, None]

    # photo: smooth gradients, shading, a soft drop shadow, film grain
    photo = _mix(bg, bg * 0.55, shadow)
    photo = _mix(photo, albedo * shade, inside)
    photo = photo + 0.025 * grain

    # sketch: pale tinted paper with diagonal hatching; the object is a dark outline around a light, cross-hatched fill
    hatch = (torch.sin((xg + yg) * 40) > 0.75).float()
    paper = _mix(bg, white, 0.45) * (1 - 0.25 * hatch)
    cross = (torch.sin((xg - yg) * 40) > 0.6).float()
    fill = _mix(albedo, white, 0.35) * (1 - 0.35 * cross)
    sketch = _mix(paper, fill, inside)
    sketch = _mix(sketch, black + 0.15, outline)
    sketch = sketch + 0.02 * grain

    # pop art: saturated flat colours, Ben-Day halftone dots on the background, thick black outlines
    dots = ((0.28 - torch.sqrt((torch.frac(xg * 6 + 100) - 0.5) ** 2 + (torch.frac(yg * 6 + 100) - 0.5) ** 2)) * 20
            + 0.5).clamp(0, 1)
    pop_bg = _posterize(bg * 1.25 - 0.1, 3)
    pop_bg = _mix(pop_bg, pop_bg * 0.35 + torch.tensor([0.6, 0.0, 0.3], device=dev)[None, :, None, None], dots * 0.8)
    pop = _mix(pop_bg, _posterize(albedo * 1.1, 3), inside)
    pop = _mix(pop, black, ((2.6 - d_px.abs()) * 0.8).clamp(0, 1)[:, None])

    # watercolour: pastel washes with blotchy pigment, soft edges darkened where pigment pools, blurred
    wash = _mix(bg, white, 0.3) * (0.85 + 0.3 * blotch)
    wc_inside = (0.5 - d_px / 3).clamp(0, 1)[:, None]
    water = _mix(wash, _mix(albedo, white, 0.25) * (0.9 + 0.2 * blotch), wc_inside)
    water = water * (1 - 0.25 * ((2.5 - d_px.abs()) / 2.5).clamp(0, 1)[:, None])
    water = _blur(water, 3)

    # pixel art (held out of base training): flat colours on 4x4-pixel blocks, 4 levels per channel
    flat = _mix(bg, albedo, inside)
    pixel = F.interpolate(F.avg_pool2d(flat, 4), scale_factor=4, mode="nearest")
    pixel = torch.round(pixel.clamp(0, 1) * 3) / 3

    img = _select([photo, sketch, pop, water, pixel], s.style)
    img = _mix(img, white, fg_alpha)  # falling snow is in front of everything
    return img.clamp(0, 1)


def to_pil(image: torch.Tensor):
    """(3, H, W) in [0, 1] -> an RGB PIL image."""
    from PIL import Image

    return Image.fromarray((image.detach().cpu().permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy())


def render_seeded(s: Scenes, seed: int) -> torch.Tensor:
    g = torch.Generator(device=s.cls.device).manual_seed(seed)
    return render(s, g)
