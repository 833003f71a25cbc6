"""The entry point the benchmark commands share: quiet libraries, UserError -> exit 2, `--json` -> one JSON line."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

from palpcompose.errors import UserError


def run_main(run: Callable, args, summary_keys: tuple[str, ...] = ()) -> int:
    """Run `run(args)` -> report dict. With args.json the last stdout line is the report as one JSON object;
    otherwise the report's `summary_keys` are printed one per line after the command's own table."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    try:
        report = run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        for key in summary_keys:
            if key in report:
                print(f"{key}: {report[key]}")
    return 0
