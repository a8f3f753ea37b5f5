"""The object-to-stream table under load, on the driver model (a test double,
not Apple hardware): what a hooked call costs in `stream` mode with the table
nearly empty, and after 100,000 distinct objects have passed through it (kept
alive: their addresses stay in the table), all measured in this one process.

Each op is the MPS op pattern (command buffer, encoder, pipeline, 2 buffers,
bytes, dispatch, end, commit, wait, release: 11 hooked calls), bugs off, no
regions, length 1, so the time is mostly the hooks' own.

    python benchmarks/stream_table.py [--ops 20000] [--threads 1,4] [--fill 100000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from agxguard import _C, _model  # noqa: E402
from agxguard.lab import model  # noqa: E402

FAKE_BASE = 0x5A5A_0000_0000  # addresses no real object has: the table only stores them


def ns_per_op(threads: int, ops: int) -> float:
    r = model.run_threads(threads, ops // threads, shared_queue=False, region=False, internal_every=0,
                          length=1, hooks=False)
    assert r["result_ok"], r
    return r["seconds"] * 1e9 / r["ops"] * threads  # per op of one thread


def fill(n: int, start: int) -> int:
    """Register n fake objects; returns how many inserts failed."""
    failed = 0
    for i in range(start, start + n):
        try:
            _model.swizzle_set_stream(FAKE_BASE + 16 * i, i)
        except RuntimeError:
            failed += 1
    return failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", type=int, default=20000)
    ap.add_argument("--threads", default="1,4")
    ap.add_argument("--fill", type=int, default=100000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    if not model.available():
        print("the driver model is unavailable in this build (no Objective-C runtime)", file=sys.stderr)
        return 2
    threads = [int(t) for t in a.threads.split(",")]
    model.configure(**{b: False for b in model.BUGS})
    model.hook()
    _C.set_mode("stream")
    ns_per_op(1, 1000)  # warm up: classes, pools
    empty = {t: min(ns_per_op(t, a.ops) for _ in range(a.repeats)) for t in threads}
    failed = fill(a.fill, 0)
    full = {t: min(ns_per_op(t, a.ops) for _ in range(a.repeats)) for t in threads}
    table = _model.swizzle_stream_table() if hasattr(_model, "swizzle_stream_table") else None
    print(f"driver model (not Apple hardware), {platform.node()} {platform.machine()}, stream mode, "
          f"{a.ops} ops, best of {a.repeats}")
    print(f"fill: {a.fill} objects, {failed} inserts failed; table: {table}")
    for t in threads:
        print(f"{t} thread(s): {empty[t]:8.0f} ns/op near-empty table, {full[t]:8.0f} ns/op after the fill, "
              f"speed after/before {empty[t] / full[t]:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"empty_ns": empty, "full_ns": full, "failed": failed, "table": table}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
