"""The toy worlds the tooling trains and measures on: one home for what tells them apart (docs/toyworld.md).

v1 is the world builtin:toy was trained on; v2 limits second colours to white and black ("v2 recipe"); v2b draws
v2's objects 1.5 times larger, so that a pattern's period covers about 4 latent pixels instead of 3 ("v2b: larger
objects", chosen from the capacity probes).
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

    def scenes(self, n: int, g: torch.Generator, device="cpu", **kwargs) -> world.Scenes:
        return world.sample_scenes(n, g, device, color2_choices=self.color2_choices, object_scale=self.object_scale,
                                   **kwargs)

    def subject(self, seed: int) -> world.Subject:
        return world.subject_from_seed(seed, self.color2_choices)

    def subject_scenes(self, subject: world.Subject, n: int, g: torch.Generator, style="photo", ambiance="day",
                       device="cpu") -> world.Scenes:
        return world.subject_scenes(subject, n, g, style, ambiance, device, object_scale=self.object_scale)


WORLDS = {w.name: w for w in (
    World("v1"),
    World("v2", ("white", "black")),
    World("v2b", ("white", "black"), (0.50, 0.70)),
)}


def world_of(color2_choices, object_scale) -> World:
    """The named world with these parameters (a checkpoint records the parameters, not the name)."""
    for w in WORLDS.values():
        if w.color2_choices == (tuple(color2_choices) if color2_choices else None) \
                and tuple(w.object_scale) == tuple(object_scale):
            return w
    return World("custom", tuple(color2_choices) if color2_choices else None, tuple(object_scale))
