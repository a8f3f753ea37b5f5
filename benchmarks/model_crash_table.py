"""Crash table of the driver model per mode: 8 threads, all bugs on, each run in
a child process. The driver model is a test double (not Apple hardware); the
numbers are the model's on the machine that runs this.

    python benchmarks/model_crash_table.py [--runs 200] [--iterations 100] [--window-yields 1]
"""
import json
import platform
import sys

from agxguard.lab import model

import _crash_args  # benchmarks/_crash_args.py, beside this script

CONFIGS = [
    ("off", dict(), {}),
    ("op", dict(), {}),
    ("op", dict(bypass=False), {}),
    ("stream", dict(), {"shared_queue": True}),
    ("stream", dict(), {"shared_queue": False}),
    ("global", dict(), {}),
    ("global", dict(), {"shared_queue": False}),
]


def main() -> int:
    a = _crash_args.parse(__doc__, default_runs=200)
    bugs = dict(context_race=True, encoder_recycle=True, buffer_recycle=True, bypass=True,
                window_yields=a.window_yields)
    rows = []
    print(f"driver model (not Apple hardware), {platform.node()} {platform.machine()}, "
          f"{a.threads} threads x {a.iterations} ops, {a.runs} runs each, window_yields={a.window_yields}")
    print(f"{'mode':7} {'queues':9} {'bugs':16} {'crashed':>9} {'share':>7}  outcomes")
    for mode, extra_bugs, kw in CONFIGS:
        b = dict(bugs, **extra_bugs)
        outcomes, messages, _ = model.tally_in_child(mode, a.runs, message_chars=90, threads=a.threads,
                                                     iterations=a.iterations, bugs=b, timeout=60, **kw)
        crashed = a.runs - outcomes["passed"]
        queues = "per-thread" if kw.get("shared_queue") is False else "shared"
        bug_note = "all" if not extra_bugs else "all but " + ",".join(k for k, v in extra_bugs.items() if not v)
        print(f"{mode:7} {queues:9} {bug_note:16} {crashed:>5}/{a.runs:<3} {crashed / a.runs:>7.1%}  {dict(outcomes)}")
        rows.append({"mode": mode, "queues": queues, "bugs": b, "runs": a.runs, "crashed": crashed,
                     "outcomes": dict(outcomes), "messages": dict(messages.most_common(5))})
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"driver": "model", "threads": a.threads, "iterations": a.iterations, "rows": rows}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
