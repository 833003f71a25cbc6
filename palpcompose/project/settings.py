"""What changes the trained weights: the settings rules that decide when trained weights are out of date.

A resolved configuration (`ProjectConfig.to_dict()`, or manifest.json's "config") is compared with another by the
settings that change the weights (`weight_settings`), key by key (`changed_weight_settings`), and the differences
are told to the user (`describe_changes`). Everything here works on plain dicts, so a manifest written by an
older palpcompose reads the same way.
"""

from __future__ import annotations

import hashlib
import json

# (section, key) -> default: keys left out of both hashes while at their default (ProjectConfig._hashed).
ADDED_LATER = {
    ("project", "allow_pickle"): False,
    ("render", "lora_scale"): 1.0,
    ("train", "adapter"): "lora",
    ("train", "buckets"): True,
    ("train", "captions"): True,
    ("train", "frozen_weights"): "mixed_precision",
    ("train", "log_with"): "none",
    ("train", "t5_tokens"): True,
}

# The one list of settings that never change the trained weights (with all of [render]): snapshot and preview
# periods, the memory savers (gradient checkpointing and the low-memory preset recompute the same values), and
# project.allow_pickle (a permission), train.log_with (a tracker only watches). Everything else changes the
# weights; train.steps only by training longer.
WEIGHT_NEUTRAL = (("train", "save_every"), ("train", "preview_every"), ("train", "gradient_checkpointing"),
                  ("train", "low_memory"), ("project", "allow_pickle"), ("train", "log_with"))


def weight_settings(config: dict, *, steps: bool = True) -> dict:
    """The part of a resolved configuration (ProjectConfig.to_dict(), or manifest.json's "config") that changes the
    trained weights: all but [render] and WEIGHT_NEUTRAL, and for guidance "none" no [palp] key but the guidance;
    without train.steps when `steps` is false (what a resume must share with the run it continues). Keys added
    since `config` was written count at their default."""
    data = json.loads(json.dumps(config))
    data.pop("render", None)
    for (section, key), default in ADDED_LATER.items():
        data.setdefault(section, {}).setdefault(key, default)
    for section, key in WEIGHT_NEUTRAL + (() if steps else (("train", "steps"),)):
        data.get(section, {}).pop(key, None)
    if data.get("palp", {}).get("guidance") == "none":  # the baseline reads no other [palp] key (method.md, step 5)
        data["palp"] = {"guidance": "none"}
    return data


def flat_settings(data: dict, prefix: str = "") -> dict:
    """A nested configuration as {dotted key: value}: {"train": {"steps": 2}} -> {"train.steps": 2}."""
    out = {}
    for key, value in data.items():
        out.update(flat_settings(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def describe_changes(changes: list[tuple[str, object, object]], most: int | None = None) -> str:
    """'train.steps 200 -> 40, palp.weight 1.0 -> 3.0, and 2 more' from (dotted key, old, new) triples; all of them
    unless `most` is given."""
    shown = changes if most is None else changes[:most]
    more = f", and {len(changes) - len(shown)} more" if len(changes) > len(shown) else ""
    return ", ".join(f"{key} {json.dumps(old)} -> {json.dumps(new)}" for key, old, new in shown) + more


def changed_weight_settings(before: dict, now: dict, *, steps: bool = True) -> list[tuple[str, object, object]]:
    """[(dotted key, old value, new value)] of the weight-changing settings that differ between two resolved
    configurations, in key order (subjects.V1.images, palp.guidance, train.steps, ...)."""
    old = flat_settings(weight_settings(before, steps=steps))
    new = flat_settings(weight_settings(now, steps=steps))
    return [(key, old.get(key), new.get(key)) for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def sha256_json(data: dict) -> str:
    """The hash of a JSON-able dict, independent of key order (ProjectConfig.hash, training_hash)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
