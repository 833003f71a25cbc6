"""torchao only when 8-bit weights are asked for (`train.frozen_weights = "int8" | "fp8"`, quantize.py).

transformers (its quantizers, imported with every model class) and diffusers' pipelines import torchao at their own
import whenever it is installed, and torchao then prints notices on stderr (CUDA extensions it cannot load, torch's
`_pytree` deprecations) on every command that loads a model. The command line holds it back (`hold_back`): a None in
`sys.modules` is Python's documented way to make `import torchao` fail and `importlib.util.find_spec` answer None,
so both libraries see it as not installed and leave it alone. quantize.py lets it through (`release`) before it
imports it itself, and nothing else of palpcompose needs it. Torch-free: the command line imports it at startup.
"""

from __future__ import annotations

import sys

TORCHAO = "torchao"  # the package's import name
_held = [False]  # whether hold_back put the None in sys.modules (release takes out only its own)


def hold_back() -> None:
    """Make torchao look uninstalled to every library imported from now on (unless it is imported already)."""
    if TORCHAO not in sys.modules:
        sys.modules[TORCHAO] = None
        _held[0] = True


def release() -> None:
    """Undo hold_back: torchao imports again (a no-op when it was not held back)."""
    if _held[0] and sys.modules.get(TORCHAO, "") is None:
        del sys.modules[TORCHAO]
    _held[0] = False
