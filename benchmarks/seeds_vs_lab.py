"""The seeds' own suites against agxguard's lab suites, side by side on CPU.

    python3 benchmarks/seeds_vs_lab.py --seeds DIR [--rounds 3] [--out FILE]

DIR holds CPU copies of the seed project's complete_story_test_suite.py,
comprehensive_test_suite.py and test_mps_parallel_story.py (dropbox/dML,
metal_mps_parallel/tests) with ``torch.device("mps")`` replaced by ``torch.device("cpu")``,
a stub agx_fix_check.py (the seeds check for their macOS driver fix) and run_seed.py (it
reports MPS present and makes torch.mps.synchronize/empty_cache no-ops, then runs the
script): see benchmarks/results/seeds_vs_lab_vm.txt for the exact steps.

Each round runs, one after the other (never at once): the seeds' story, the lab's story
in ``global`` (the seeds' Semaphore(1)), the seeds' comprehensive throughput chapter on
small_mlp and matmul, the lab's in ``global`` and ``off`` (the seeds take no lock there),
and test_mps_parallel_story standalone. It prints the figures per round, then their
median and spread, and the claims' verdicts on each side.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

THREADS = (1, 2, 4, 8)
COMP_WORKLOADS = ("small_mlp", "matmul")


def run_seed(seeds: str, script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "run_seed.py", script, *args], cwd=seeds,
                          capture_output=True, text=True, timeout=1200)
    return proc.stdout + proc.stderr


def parse_seed_story(text: str) -> dict:
    eff = {}
    for m in re.finditer(r"^\s+(\d)\s+\|\s+([\d.]+)\s+\|", text, re.M):
        eff[int(m.group(1))] = float(m.group(2))
    b8 = re.search(r"Batched \(1 thread, batch=8\)\s+\|\s+([\d.]+)", text)
    t8 = re.search(r"Threaded \(8 threads, batch=1\)\|\s+([\d.]+)", text)
    verdicts = dict(re.findall(r"^\s+(\w+): (PASS|FAIL)$", text, re.M))
    return {"ops_per_s": eff, "batched": float(b8.group(1)) if b8 else None,
            "threaded": float(t8.group(1)) if t8 else None, "verdicts": verdicts}


def parse_seed_comprehensive(text: str) -> dict:
    out, wl = {}, None
    for line in text.splitlines():
        m = re.match(r"^  (\w+):$", line)
        if m:
            wl = m.group(1)
            continue
        m = re.match(r"^\s+(\d) threads: ([\d.]+) ops/s", line)
        if m and wl:
            out.setdefault(wl, {})[int(m.group(1))] = float(m.group(2))
        m = re.match(r"^\s+Scaling: Best: ([\d.]+)x", line)
        if m and wl:
            out.setdefault(wl, {})["best"] = float(m.group(1))
    return out


def lab_story(mode: str) -> dict:
    from agxguard.lab import story
    from agxguard.lab import claims
    r = story("cpu", mode, retries=0, progress=None, plot=False)
    rates = {int(x["threads"]): x["value"]["ops_per_s"] for x in r.results_for(mode, "efficiency")}
    spreads = {int(x["threads"]): x["value"]["ops_per_s_spread"]["rel_spread"]
               for x in r.results_for(mode, "efficiency")}
    bat = {(x["threads"], x["batch"]): x["value"]["samples_per_s"] for x in r.results_for(mode, "batching")}
    return {"ops_per_s": rates, "rel_spread": spreads, "batched": bat.get((1, 8)),
            "threaded": bat.get((8, 1)), "claims": claims.evaluate("story", r.results_for(mode))}


def lab_comprehensive(mode: str) -> dict:
    from agxguard.lab import comprehensive
    from agxguard.lab import claims
    r = comprehensive("cpu", mode, chapter="throughput", workloads=",".join(COMP_WORKLOADS),
                      retries=0, progress=None, plot=False)
    out = {}
    for x in r.results_for(mode, "throughput"):
        out.setdefault(x["workload"], {})[int(x["threads"])] = x["value"]["ops_per_s"]
    return {"ops_per_s": out, "claims": claims.evaluate("comprehensive", r.results_for(mode))}


def eff(rates: dict, n: int):
    return rates[n] / rates[1] / n if rates.get(1) and rates.get(n) else None


def med_spread(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    m = statistics.median(xs)
    return "%.1f [%.1f..%.1f]" % (m, min(xs), max(xs))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", required=True)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    rows = {}

    def add(key, value):
        rows.setdefault(key, []).append(value)

    t0 = time.time()
    for k in range(args.rounds):
        s = parse_seed_story(run_seed(args.seeds, "complete_story_test_suite.py"))
        for n in THREADS:
            add(("story", "seeds", "ops/s @%d" % n), s["ops_per_s"].get(n))
            if n > 1:
                add(("story", "seeds", "eff @%d %%" % n), 100 * (eff(s["ops_per_s"], n) or float("nan")))
        add(("story", "seeds", "batched/threaded"), s["batched"] / s["threaded"] if s["threaded"] else None)
        add(("story", "seeds", "verdicts"), " ".join("%s=%s" % kv for kv in sorted(s["verdicts"].items())))
        lab = lab_story("global")
        for n in THREADS:
            add(("story", "lab global", "ops/s @%d" % n), lab["ops_per_s"].get(n))
            if n > 1:
                add(("story", "lab global", "eff @%d %%" % n), 100 * (eff(lab["ops_per_s"], n) or float("nan")))
        add(("story", "lab global", "batched/threaded"),
            lab["batched"] / lab["threaded"] if lab["threaded"] else None)
        add(("story", "lab global", "verdicts"), " ".join(
            "%s=%s" % (c["name"], {True: "PASS", False: "FAIL", None: "N/M"}[c["passed"]]) for c in lab["claims"]))
        c = parse_seed_comprehensive(run_seed(args.seeds, "comprehensive_test_suite.py", "--categories",
                                              "throughput", "--models", ",".join(COMP_WORKLOADS)))
        for wl in COMP_WORKLOADS:
            for n in THREADS:
                add(("comprehensive " + wl, "seeds", "ops/s @%d" % n), c.get(wl, {}).get(n))
            add(("comprehensive " + wl, "seeds", "best speedup"), c.get(wl, {}).get("best"))
        for mode in ("global", "off"):
            lc = lab_comprehensive(mode)
            for wl in COMP_WORKLOADS:
                for n in THREADS:
                    add(("comprehensive " + wl, "lab " + mode, "ops/s @%d" % n), lc["ops_per_s"].get(wl, {}).get(n))
                cl = [x for x in lc["claims"] if x["name"] == wl + " scaling"]
                add(("comprehensive " + wl, "lab " + mode, "best speedup"),
                    float(cl[0]["measured"].split("x")[0]) if cl and cl[0]["passed"] is not None else None)
        t = run_seed(args.seeds, "test_mps_parallel_story.py")
        add(("test_mps_parallel_story", "seeds", "verdicts"), " ".join(
            "%s=%s" % (a.replace("test_claim_", ""), b)
            for a, b in re.findall(r"Running (test_claim_\w+)\.\.\. (PASS|FAIL)", t)))
        print("round %d done at %.0fs" % (k + 1, time.time() - t0), file=sys.stderr, flush=True)

    print("rounds: %d; figures: median [min..max] over the rounds" % args.rounds)
    for key, vals in rows.items():
        if all(isinstance(v, str) for v in vals):
            for i, v in enumerate(vals):
                print("%-28s %-11s %-16s round %d: %s" % (key[0], key[1], key[2], i + 1, v))
        else:
            print("%-28s %-11s %-16s %s" % (key[0], key[1], key[2], med_spread(vals)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
