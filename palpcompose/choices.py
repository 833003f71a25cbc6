"""Allowed values the command line offers as options: one tuple each, here, where nothing heavy is imported.

`cli.py` builds its `--guidance` and `--scheduler` help from them at import time, before torch is loaded (so
`palpcompose --help` starts in a fraction of a second); guidance.py and project/schema.py re-export them.
"""

GUIDANCE_MODES = ("palp", "sds", "none")  # palp.guidance (guidance.py implements each)
SCHEDULER_NAMES = ("dpm++", "ddim", "euler-a")  # render.scheduler (render.SCHEDULERS implements each)
