"""Crash table of the AGX hook set on the driver model: the hooks come from
``import agxguard`` with AGXGUARD_DRIVER=model (not from model.hook()), each run
in a child process, 8 native threads on one shared queue. One row per race
class and mode. The driver model is a test double in C (not Apple hardware);
these are its numbers on the machine that runs this.

    python benchmarks/hooks_crash_table.py [--runs 100] [--iterations 100] [--json out.json]
"""
import json
import platform
import sys
import time

from agxguard.lab import model

import _crash_args  # benchmarks/_crash_args.py, beside this script

NONE = dict(context_race=False, encoder_recycle=False, buffer_recycle=False, bypass=False)
# (race class, bugs on, mode, run options)
ROWS = [
    ("recycled encoder", dict(encoder_recycle=True), "off", {}),
    ("recycled encoder", dict(encoder_recycle=True), "op", {}),
    ("two encoders / double commit", dict(buffer_recycle=True), "off", {}),
    ("two encoders / double commit", dict(buffer_recycle=True), "op", {}),
    ("context 0x98, no bypass", dict(context_race=True), "off", {}),
    ("context 0x98, no bypass", dict(context_race=True), "op", {}),
    ("context 0x98 via bypass", dict(context_race=True, bypass=True), "op", {}),
    ("all but bypass", dict(context_race=True, encoder_recycle=True, buffer_recycle=True), "op", {}),
    ("all but bypass", dict(context_race=True, encoder_recycle=True, buffer_recycle=True), "stream", {}),
    ("all bugs", dict(context_race=True, encoder_recycle=True, buffer_recycle=True, bypass=True), "op", {}),
    ("all bugs", dict(context_race=True, encoder_recycle=True, buffer_recycle=True, bypass=True), "global", {}),
]
ENV = {"AGXGUARD_DRIVER": "model"}


def run_row(bugs, mode, kw, runs, threads, iterations, window_yields):
    b = dict(NONE, **bugs, window_yields=window_yields)
    outcomes, messages, results = model.tally_in_child(
        mode, runs, threads=threads, iterations=iterations, bugs=b, timeout=60, env=ENV,
        hooks=False, region=(mode == "global"), internal_every=4, **kw)
    lifecycle_ok = 0
    for result in results:
        if result["hooks_driver"] == "model":
            lc = result["lifecycle"]
            lifecycle_ok += lc["encoders_created"] == lc["encoders_ended"] and lc["encoders_open"] == 0
    return outcomes, messages, lifecycle_ok


def main() -> int:
    a = _crash_args.parse(__doc__, default_runs=100)
    print(f"AGX hook set from import (AGXGUARD_DRIVER=model) on the driver model (not Apple hardware), "
          f"{platform.node()} {platform.machine()}, {a.threads} threads x {a.iterations} ops on one queue, "
          f"internal path every 4th op, {a.runs} child runs per row, window_yields={a.window_yields}")
    print(f"{'race class':30} {'mode':7} {'crashed':>9} {'share':>7} {'created==ended':>15}  outcomes")
    rows = []
    t0 = time.monotonic()
    for name, bugs, mode, kw in ROWS:
        outcomes, messages, lc_ok = run_row(bugs, mode, kw, a.runs, a.threads, a.iterations, a.window_yields)
        crashed = a.runs - outcomes["passed"]
        print(f"{name:30} {mode:7} {crashed:>5}/{a.runs:<3} {crashed / a.runs:>7.1%} {lc_ok:>8}/{outcomes['passed']:<6}"
              f"  {dict(outcomes)}", flush=True)
        rows.append({"race_class": name, "bugs": bugs, "mode": mode, "runs": a.runs, "crashed": crashed,
                     "outcomes": dict(outcomes), "lifecycle_balanced_runs": lc_ok,
                     "messages": dict(messages.most_common(5))})
    print(f"({time.monotonic() - t0:.0f}s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"driver": "model (test double, not Apple hardware)", "hooks": "from import",
                       "threads": a.threads, "iterations": a.iterations, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
