"""agxguard.ops(): the torch function mode that locks each torch op."""
from __future__ import annotations

import threading
import time

import pytest

torch = pytest.importorskip("torch", reason="agxguard.ops() needs torch; install torch to run these")

import agxguard  # noqa: E402
import agxguard._model  # noqa: E402
from conftest import run_threads  # noqa: E402

THREADS, ITERS = 8, 20


def _ops_calling_back(detector):
    """Each thread runs torch ops whose own work calls back into Python
    (Tensor.apply_ runs the function per element, inside the op)."""

    def worker(i):
        with agxguard.ops():
            for _ in range(ITERS):
                torch.zeros(2).apply_(lambda v: detector.inside() or v)

    run_threads(THREADS, worker)


def test_op_mode_never_overlaps_two_torch_ops(detector):
    agxguard.set_mode("op")
    _ops_calling_back(detector)
    assert detector.entries == THREADS * ITERS * 2
    assert detector.max_total == 1


def test_off_mode_lets_torch_ops_overlap(detector):
    agxguard.set_mode("off")
    _ops_calling_back(detector)
    assert detector.max_total > 1


def test_no_thread_starves_on_the_op_lock():
    """Only one waiter (the heir) watches the op lock, and a thread that keeps the
    GIL retakes the lock before the heir gets the GIL; the heir's claim after 5 ms
    must still give every thread its turns (without it, on a 2-core VM, one thread
    ran 7 ops in a second while another ran 50,000, and waits reached 0.3-0.5 s;
    with it the longest wait was 10-15 ms)."""
    agxguard.set_mode("op")
    x, w = torch.randn(64, 64), torch.randn(64, 64)
    n = 4
    counts = [0] * n
    stop = threading.Event()

    def worker(i):
        with agxguard.ops():
            while not stop.is_set():
                torch.mm(x, w)
                counts[i] += 1

    agxguard.reset_stats()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join()
    total = sum(counts)
    assert total > 100, counts
    assert min(counts) >= total / (20 * n), f"a thread starved: {counts}"
    max_wait_ms = agxguard.stats()["domains"]["op"]["max_wait_ns"] / 1e6
    assert max_wait_ms < 250, f"a thread waited {max_wait_ms:.0f} ms for the op lock"


def test_each_torch_op_takes_the_op_lock_once():
    agxguard.set_mode("op")
    a, b = torch.ones(3), torch.ones(3)
    with agxguard.ops():
        agxguard.reset_stats()
        for _ in range(10):
            torch.add(a, b)
    assert agxguard.stats()["domains"]["op"]["acquisitions"] == 10


def test_ops_results_equal_unguarded_results_and_errors_propagate():
    agxguard.set_mode("op")
    x = torch.randn(4, 8)
    layer = torch.nn.Linear(8, 3)
    expected = layer(x)
    with agxguard.ops():
        assert torch.equal(layer(x), expected)
        with pytest.raises(RuntimeError):
            torch.mm(torch.ones(2, 3), torch.ones(2, 3))
    assert not agxguard.op_lock().locked()
    assert agxguard._model.region_depth() == 0


def test_ops_in_global_mode_is_reentrant_with_a_region():
    agxguard.set_mode("global")
    with agxguard.guard(), agxguard.ops():
        torch.add(torch.ones(1), 1)
    g = agxguard.stats()["domains"]["global"]
    assert g["acquisitions"] == 1 and g["reentries"] >= 1


def test_metadata_reads_pass_through_without_the_lock():
    agxguard.set_mode("op")
    x = torch.ones(2, 3)
    with agxguard.ops():
        agxguard.reset_stats()
        _ = (x.shape, x.dtype, x.dim(), x.size(0), x.T, x.numel())
        with torch.no_grad():
            pass
        assert agxguard.stats()["domains"]["op"]["acquisitions"] == 0
        x + 1
        assert agxguard.stats()["domains"]["op"]["acquisitions"] == 1


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_setaffinity"),
                    reason="pin_cpus needs os.sched_setaffinity (Linux)")
def test_ops_pin_cpus_pins_the_thread_inside_and_restores_it():
    import os
    before = os.sched_getaffinity(0)
    cpu = min(before)
    with agxguard.ops(pin_cpus={cpu}):
        assert os.sched_getaffinity(0) == {cpu}
        torch.add(torch.ones(1), 1)
    assert os.sched_getaffinity(0) == before


def test_ops_pin_cpus_rejects_bad_values():
    with pytest.raises(TypeError, match="pin_cpus"):
        agxguard.ops(pin_cpus="0")
    with pytest.raises(TypeError, match="pin_cpus"):
        agxguard.ops(pin_cpus=set())
    with pytest.raises(ValueError, match="may not use"):
        agxguard.ops(pin_cpus={10_000})


# ---- ops(level="dispatch"): the lock per ATen operator, at torch's Python dispatch key

_probe_detector = None


@torch.library.custom_op("agxguard_test::probe", mutates_args=())
def _probe(x: torch.Tensor) -> torch.Tensor:
    """An ATen operator whose kernel reports itself to the overlap detector."""
    _probe_detector.inside()
    return x.clone()


def _probes(detector, level):
    global _probe_detector
    _probe_detector = detector

    def worker(i):
        with agxguard.ops(level=level):
            for _ in range(ITERS):
                _probe(torch.ones(2))

    run_threads(THREADS, worker)


def test_dispatch_level_never_overlaps_two_operators(detector):
    agxguard.set_mode("op")
    _probes(detector, "dispatch")
    assert detector.entries == THREADS * ITERS
    assert detector.max_total == 1


def test_dispatch_level_in_off_mode_lets_operators_overlap(detector):
    agxguard.set_mode("off")
    _probes(detector, "dispatch")
    assert detector.max_total > 1


def test_dispatch_level_keeps_the_fused_transformer_path_as_one_locked_call():
    """Under a function mode torch runs nn.TransformerEncoderLayer as separate ops;
    under the dispatch mode the fused layer stays one operator: far fewer locks,
    same results."""
    from agxguard.lab import workloads

    agxguard.set_mode("op")
    w = workloads.build("story_transformer")
    x = w.make_input()
    expected = w.model(x)
    counts = {}
    for level in ("function", "dispatch"):
        agxguard.reset_stats()
        with agxguard.ops(level=level):
            got = w.model(x)
        counts[level] = agxguard.stats()["domains"]["op"]["acquisitions"]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert 0 < counts["dispatch"] < counts["function"], counts


def test_an_unknown_ops_level_is_a_value_error_naming_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown ops level 'aten'; allowed: function, dispatch"):
        agxguard.ops(level="aten")
