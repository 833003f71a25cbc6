"""Allowed values the command line offers as options: one tuple each, here, where nothing heavy is imported.

`cli.py` builds its `--template`, `--guidance` and `--scheduler` help from them at import time, before torch is
loaded (so `palpcompose --help` starts in a fraction of a second); guidance.py, project/init.py and
project/schema.py re-export them.
"""

# `init --template` (project/init.py makes each from the folder of the same name in templates/)
TEMPLATES = ("single-subject", "multi-subject", "art-inspired", "flux-art-inspired", "sd3-art-inspired", "toy-demo")
DEFAULT_TEMPLATE = "art-inspired"
GUIDANCE_MODES = ("palp", "sds", "none")  # palp.guidance (guidance.py implements each)
# render.scheduler (sampling.SCHEDULERS implements each); each family declares the ones it renders with
# (models.family.Family.samplers): Stable Diffusion's samplers, and the flow-matching Euler of Flux.1 and SD 3
SD_SCHEDULER_NAMES = ("dpm++", "ddim", "euler-a")
FLOW_SCHEDULER_NAMES = ("euler",)
SCHEDULER_NAMES = SD_SCHEDULER_NAMES + FLOW_SCHEDULER_NAMES
# An image side (train.resolution, render.width/height, --width/--height), in words: what models.size_alignment
# computes from a model's configs, for the released models of each family
SIZE_RULE = ("a multiple of 8 (of 16 for Flux.1 and SD 3: their VAE's factor 8 times the transformer's 2x2 latent "
             "patches)")
