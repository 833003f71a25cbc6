"""The toy worlds the tooling trains and measures on: one home for what tells them apart (docs/toyworld.md).

v1 is the world builtin:toy was trained on; v2 limits second colours to white and black ("v2 recipe"); v2b draws
v2's objects 1.5 times larger, so that a pattern's period covers about 4 latent pixels instead of 3 ("v2b: larger
objects", chosen from the capacity probes); v2c draws v2b's objects with one pattern frequency and angle (in the
object's frame), so that a pattern word names one texture ("v2c", chosen from the loss-gap diagnosis).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from palpcompose.toyworld import world


@dataclass(frozen=True)
class World:
    name: str
    color2_choices: tuple[str, ...] | None = None  # None: any colour but the main one, or white / black (v1)
    object_scale: tuple[float, float] = world.OBJECT_SCALE
    pattern_freq: tuple[float, float] = world.PATTERN_FREQ
    pattern_angle: tuple[float, float] = world.PATTERN_ANGLE

    @property
    def layout(self) -> dict:
        """The keyword arguments of world.sample_layout / sample_scenes that draw this world's layouts."""
        return {"object_scale": self.object_scale, "pattern_freq": self.pattern_freq,
                "pattern_angle": self.pattern_angle}

    def scenes(self, n: int, g: torch.Generator, device="cpu", **kwargs) -> world.Scenes:
        return world.sample_scenes(n, g, device, color2_choices=self.color2_choices, **self.layout, **kwargs)

    def subject(self, seed: int) -> world.Subject:
        return world.subject_from_seed(seed, self.color2_choices, self.pattern_freq, self.pattern_angle)

    def subject_scenes(self, subject: world.Subject, n: int, g: torch.Generator, style="photo", ambiance="day",
                       device="cpu") -> world.Scenes:
        return world.subject_scenes(subject, n, g, style, ambiance, device, object_scale=self.object_scale)


WORLDS = {w.name: w for w in (
    World("v1"),
    World("v2", ("white", "black")),
    World("v2b", ("white", "black"), (0.50, 0.70)),
    World("v2c", ("white", "black"), (0.50, 0.70), (2.2, 2.2), (0.3, 0.3)),
)}


def world_of(color2_choices, object_scale, pattern_freq=world.PATTERN_FREQ,
             pattern_angle=world.PATTERN_ANGLE) -> World:
    """The named world with these parameters (a checkpoint records the parameters, not the name)."""
    params = (tuple(color2_choices) if color2_choices else None, tuple(object_scale), tuple(pattern_freq),
              tuple(pattern_angle))
    for w in WORLDS.values():
        if (w.color2_choices, w.object_scale, w.pattern_freq, w.pattern_angle) == params:
            return w
    return World("custom", *params)


def world_of_config(cfg) -> World:
    """The world a training recipe (anything with color2_choices, object_scale, pattern_freq, pattern_angle)
    draws."""
    return world_of(cfg.color2_choices, cfg.object_scale, cfg.pattern_freq, cfg.pattern_angle)
