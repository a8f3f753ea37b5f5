"""agxguard.lab.workloads: the shared models build, run, and reject bad names."""
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from agxguard.lab import workloads  # noqa: E402

OUTPUT_SHAPES = {
    "small_mlp": (32, 256),
    "medium_mlp": (32, 512),
    "story_transformer": (4, 32, 256),
    "large_transformer": (4, 128, 512),
    "matmul": (512, 512),
}


@pytest.mark.parametrize("name", workloads.WORKLOADS)
def test_each_workload_runs_on_cpu_with_the_expected_shapes(name):
    w = workloads.build(name, "cpu")
    x = w.make_input()
    y = w.model(x)
    assert tuple(x.shape) == workloads.INPUT_SHAPES[name]
    assert tuple(y.shape) == OUTPUT_SHAPES[name]
    assert not y.requires_grad


def test_a_batch_of_n_is_n_requests_concatenated_along_dim_0():
    w = workloads.build("small_mlp")
    x = w.make_input(batch=8)
    assert x.shape[w.request_batch_dim] == 8 * 32
    y = w.model(x)
    first = w.model(x[:32])
    torch.testing.assert_close(y[:32], first)


def test_same_seed_gives_same_weights_and_inputs_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = workloads.build("medium_mlp", seed=3)
    b = workloads.build("medium_mlp", seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    x = a.make_input(seed=5)
    assert torch.equal(x, b.make_input(seed=5))
    assert torch.equal(a.model(x), b.model(x))
    assert not torch.equal(x, a.make_input(seed=6))


def test_unknown_workload_names_the_bad_value_and_the_allowed_ones():
    with pytest.raises(ValueError, match="'nope'.*small_mlp"):
        workloads.build("nope")


def test_unknown_device_names_the_bad_value_and_the_allowed_ones():
    with pytest.raises(ValueError, match="'tpu'.*cpu, cuda, mps"):
        workloads.build("small_mlp", device="tpu")


def test_bad_dtype_and_batch_are_refused():
    with pytest.raises(ValueError, match="int8"):
        workloads.build("matmul", dtype="int8")
    with pytest.raises(ValueError, match="batch"):
        workloads.build("matmul").make_input(batch=0)


def test_best_device_is_one_torch_can_use_and_sync_accepts_it():
    dev = workloads.best_device()
    assert dev in ("mps", "cuda", "cpu")
    workloads.sync(dev)
    workloads.sync("cpu")


def test_module_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import agxguard.lab.workloads as w; assert 'small_mlp' in w.WORKLOADS\n")
    subprocess.run([sys.executable, "-c", code], check=True)
