"""Markdown table of a hostile_sweep.py record (JSON lines on stdin): one row per case, for docs/hostile-inputs.md.
Later records of the same case (a rerun) replace earlier ones."""

import json
import re
import sys

rows = {}
for line in sys.stdin:
    if line.strip():
        r = json.loads(line)
        rows[(r["group"], r["case"])] = r


def message(r):
    text = r.get("message", "")
    if re.match(r"error: \d+ problems? found:", text):  # the first located problem is what the user reads
        problems = [p.strip()[2:] for p in r.get("stderr_tail", "").splitlines() if p.strip().startswith("- ")]
        if problems:
            text = "error: " + problems[0]
    text = re.sub(r"/tmp/hs/case-\d+/", "", text)
    return text[:170].replace("|", "\\|").replace("\n", " ")


def wrote(r):
    parts = []
    if r.get("n_written"):
        parts.append(f"wrote {r['n_written']}")
    if r.get("lost"):
        parts.append("removed " + ", ".join(r["lost"][:3]))
    if r.get("changed"):
        parts.append(f"changed {len(r['changed'])} ({', '.join(r['changed'][:2])}...)")
    if r.get("traceback"):
        parts.append("**traceback**")
    for key in ("background", "after"):
        if r.get(key):
            parts.append(f"{key}: exit {r[key]['code']}" + (f" ({r[key]['message'][:70]})" if r[key].get("message")
                                                         else ""))
    return "; ".join(parts).replace("|", "\\|") or "nothing"


print("| # | command | case | expected | exit | first line of the message | written / lost |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for n, r in enumerate(rows.values(), 1):
    args = r.get("args") or ["?"]
    print(f"| {n} | {args[0]} | {r['case'].replace('|', '/')} | {r.get('expect', '')} | {r['code']} | "
          f"{message(r)} | {wrote(r)} |")
