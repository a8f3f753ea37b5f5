"""The benchmark scripts still run end to end (tiny sizes, cpu): a refactor that breaks
one fails here, not on the GPU machine. Their figures are not checked: speed targets
live in the benchmarks, not in timed tests."""
from __future__ import annotations

import json
import re
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch", reason="the benchmarks measure torch workloads; install torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args: str, timeout: float = 300) -> str:
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{args[0]} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_efficiency_runs_every_config_and_writes_json(tmp_path):
    out = tmp_path / "eff.json"
    text = run("benchmarks/efficiency.py", "--device", "cpu", "--workloads", "small_mlp",
               "--threads", "1,2", "--duration", "0.05", "--warmup", "1", "--json", str(out), "--no-plot")
    report = json.loads(out.read_text())
    configs = {r["config"] for r in report["results"] if "throughput" in r}
    assert configs == {"free", "lock", "semaphore2", "op", "op_dispatch", "ops_unlocked", "stream", "global",
                       "batcher", "batcher_nospin", "offline"}, configs
    assert all(r["throughput"] > 0 for r in report["results"] if "throughput" in r)
    nospin = [r for r in report["results"] if r["config"] == "batcher_nospin"]
    assert nospin and all(r["batcher"]["spin_us"] == 0 for r in nospin)
    assert "Targets at 2 threads" in text


def test_efficiency_runs_the_server_pattern_and_global_variants(tmp_path):
    out = tmp_path / "eff.json"
    text = run("benchmarks/efficiency.py", "--device", "cpu", "--workloads", "small_mlp@server",
               "--configs", "lock,global,global@grace+noclaim,global@direct", "--threads", "2",
               "--duration", "0.05", "--warmup", "1", "--repeats", "2", "--json", str(out), "--no-plot")
    report = json.loads(out.read_text())
    rows = {r["config"]: r for r in report["results"]}
    assert set(rows) == {"lock", "global", "global@grace+noclaim", "global@direct"}
    assert all(r["workload"] == "small_mlp@server" and len(r["throughput_runs"]) == 2 for r in rows.values())
    assert all("handoffs" in s for s in rows["global@direct"]["lock_stats_runs"])
    targets = {t["config"]: t for t in report["targets"]}
    assert set(targets) == {"global", "global@grace+noclaim", "global@direct"}
    assert all(len(t["ratio_runs"]) == 2 and t["ratio_min"] <= t["ratio"] <= t["ratio_max"] for t in targets.values())
    assert "server pattern" in text


def test_efficiency_interleaves_slices_in_one_pool(tmp_path):
    """--slice: every thread config measured once per round, rounds paired, the
    per-thread counts kept, the ratio of totals with its bootstrap interval."""
    out = tmp_path / "eff.json"
    text = run("benchmarks/efficiency.py", "--device", "cpu", "--workloads", "small_mlp@server",
               "--configs", "lock,global,offline", "--threads", "3", "--duration", "0.05", "--slice", "0.05",
               "--warmup", "1", "--repeats", "3", "--json", str(out), "--no-plot")
    report = json.loads(out.read_text())
    rows = {r["config"]: r for r in report["results"]}
    assert set(rows) == {"lock", "global", "offline"}
    assert all(len(rows[c]["throughput_runs"]) == 3 for c in rows)
    (t,) = [t for t in report["targets"] if t["config"] == "global"]
    lo, hi = t["total_ratio_ci95"]
    assert lo <= t["total_ratio"] <= hi and len(t["ratio_runs"]) == 3
    assert text.count("small_mlp@server lock N=3") == 3 and "busiest thread" in text
    bad = subprocess.run([sys.executable, "benchmarks/efficiency.py", "--slice", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--slice must be > 0 seconds, not 0.0" in bad.stderr


def test_host_noise_reports_every_cpu():
    text = run("benchmarks/host_noise.py", "--device", "cpu", "--sample", "0.02", "--rounds", "2")
    assert "median max/min of one CPU's samples" in text
    assert len([ln for ln in text.splitlines() if re.match(r"^\d+\s", ln)]) == len(os.sched_getaffinity(0))


def test_efficiency_rejects_an_unknown_config():
    r = subprocess.run([sys.executable, "benchmarks/efficiency.py", "--configs", "free,bogus"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown config(s) bogus" in r.stderr
    r = subprocess.run([sys.executable, "benchmarks/efficiency.py", "--configs", "global@fast"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown config(s) global@fast" in r.stderr


def test_op_contention_reports_every_variant():
    text = run("benchmarks/op_contention.py", "--device", "cpu", "--threads", "2", "--duration", "0.05",
               "--repeats", "1", "--heir-spins", "20", "--pins", "0")
    for name in ("free", "op", "op, no heir seat", "op, heir spin 20 us", "op pinned {0}", "free pinned {0}"):
        assert f"  {name} " in text, (name, text)


def test_wakeup_ring_reports_each_waitable():
    text = run("benchmarks/wakeup_ring.py", "--threads", "3", "--hops", "300", "--repeats", "1")
    for name in ("Wakeup spin 2000 us", "Wakeup spin 0", "_thread lock"):
        assert name in text


def test_batch_anatomy_reports_each_part():
    text = run("benchmarks/batch_anatomy.py", "--device", "cpu", "--workload", "small_mlp", "--batch", "2",
               "--duration", "0.05", "--repeats", "1")
    for name in ("offline fn(batch)", "cat + fn + chunk", "Batcher batch run", "Batcher cycle"):
        assert name in text


@pytest.mark.parametrize("script", ["benchmarks/model_crash_table.py", "benchmarks/hooks_crash_table.py"])
def test_crash_tables_run_one_child_per_row(script):
    from agxguard.lab import model

    if not model.available():
        pytest.skip("the driver model needs an Objective-C runtime (Debian: gobjc, libobjc-12-dev)")
    text = run(script, "--runs", "1", "--iterations", "10")
    assert "driver model (not Apple hardware)" in text
    assert "global" in text
    assert re.search(r" [01]/1 ", text), text  # one child run per row, crashed or not


def test_forwarder_benchmark_reports_each_variant():
    M = pytest.importorskip("agxguard._model", reason="the lab's module agxguard._model is not built")
    if not hasattr(M, "forward_bench"):
        pytest.skip("this build has no Objective-C runtime: no forwarder probes")
    text = run("benchmarks/forwarder.py", "--calls", "2000", "--rounds", "1")
    for name in ("unhooked", "typed wrapper", "forwarder (libffi)", "copy: unhooked", "copy: forwarder"):
        assert f" {name} " in text, (name, text)
    assert "command: python benchmarks/forwarder.py" in text and "commit: " in text


def test_seeds_vs_lab_reads_the_seeds_printed_figures():
    import importlib.util
    spec = importlib.util.spec_from_file_location("seeds_vs_lab", os.path.join(ROOT, "benchmarks/seeds_vs_lab.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    story = mod.parse_seed_story(
        "     1       |   126.3    |  1.00x  |  100.0%\n     8       |    85.9    |  0.68x  |  8.5%\n"
        "Batched (1 thread, batch=8)  |     145.9 |  1.00x (baseline)\n"
        "Threaded (8 threads, batch=1)|     165.2 |  1.13x\n  batching_advantage: FAIL\n")
    assert story["ops_per_s"] == {1: 126.3, 8: 85.9} and (story["batched"], story["threaded"]) == (145.9, 165.2)
    assert story["verdicts"] == {"batching_advantage": "FAIL"}
    comp = mod.parse_seed_comprehensive("  small_mlp:\n    1 threads: 900.5 ops/s (baseline)\n"
                                        "    2 threads: 1200.0 ops/s (1.33x)\n    Scaling: Best: 1.40x at 2 threads\n")
    assert comp == {"small_mlp": {1: 900.5, 2: 1200.0, "best": 1.40}}
    assert "seeds" in run("benchmarks/seeds_vs_lab.py", "--help")


def test_every_result_file_is_indexed_and_small():
    """benchmarks/README.md indexes every file under benchmarks/results/ (issue 12: one
    current result per benchmark and machine, each findable), and none is over 1 MB."""
    folder = os.path.join(ROOT, "benchmarks", "results")
    index = open(os.path.join(ROOT, "benchmarks", "README.md")).read()
    names = sorted(os.listdir(folder))
    assert names
    missing = []
    for name in names:
        stem, ext = os.path.splitext(name)
        # a .json/.png beside a listed .txt is listed as "(+ .json)"; else the file is named
        if name not in index and not (ext in (".json", ".png") and stem + ".txt" in index):
            missing.append(name)
        assert os.path.getsize(os.path.join(folder, name)) <= 1 << 20, name
    assert not missing, f"not in benchmarks/README.md: {missing}"
