"""The seeds' workloads as one small shared module: models, inputs, device helpers.

Used by the benchmarks, the suites and the tests, so that every measurement runs the
same models. torch is imported inside the functions: ``import agxguard`` works without it.

Each workload has a per-request input shape; a batch of N requests is N of those
concatenated along dim 0 (``request_batch_dim``), which is how the Batcher and offline
batching build theirs.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

__all__ = ["WORKLOADS", "Workload", "build", "sync", "best_device", "available_devices"]

#: Workload names, in the order the reports list them.
WORKLOADS: tuple[str, ...] = (
    "small_mlp",
    "medium_mlp",
    "story_transformer",
    "large_transformer",
    "matmul",
)

#: Per-request input shape of each workload (dim 0 is the batch dimension).
INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "small_mlp": (32, 256),
    "medium_mlp": (32, 512),
    "story_transformer": (4, 32, 256),
    "large_transformer": (4, 128, 512),
    "matmul": (512, 512),
}

#: One line per workload, for reports.
DESCRIPTIONS: dict[str, str] = {
    "small_mlp": "Linear 256->256, input 32x256",
    "medium_mlp": "Linear 512->1024, ReLU, Linear 1024->512, input 32x512",
    "story_transformer": "TransformerEncoder 2 layers, d_model 256, 4 heads, feed-forward 1024, "
                         "no dropout, input 4x32x256",
    "large_transformer": "TransformerEncoder 6 layers, d_model 512, 8 heads, feed-forward 2048, "
                         "no dropout, input 4x128x512",
    "matmul": "512x512 @ 512x512",
}

_DEVICE_KINDS = ("cpu", "cuda", "mps")


class Workload:
    """One built workload: a model on a device and a way to make its inputs.

    ``model(x)`` runs the forward pass without autograd (the no_grad is inside, so each
    thread gets it). ``module`` is the underlying ``nn.Module`` (None for ``matmul``).
    """

    request_batch_dim = 0

    def __init__(self, name: str, model: Callable[[Any], Any], module: Any,
                 input_shape: tuple[int, ...], device: Any, dtype: Any, seed: int):
        self.name = name
        self.model = model
        self.module = module
        self.input_shape = input_shape
        self.device = device
        self.dtype = dtype
        self.seed = seed
        self.description = DESCRIPTIONS[name]

    def make_input(self, batch: int = 1, seed: Optional[int] = None, rows: Optional[int] = None):
        """A reproducible input of ``batch`` requests concatenated along dim 0.

        ``seed`` defaults to the workload's seed + 1, so inputs never equal weights.
        ``rows`` replaces the request's dim-0 size (the seeds' story batches samples of
        1x32x256, where its request is 4x32x256: ``rows=1``).
        """
        import torch

        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise ValueError(f"batch must be an int >= 1, got {batch!r}")
        if rows is not None and (not isinstance(rows, int) or isinstance(rows, bool) or rows < 1):
            raise ValueError(f"rows must be None or an int >= 1, got {rows!r}")
        gen = torch.Generator(device="cpu")
        gen.manual_seed(self.seed + 1 if seed is None else int(seed))
        shape = ((self.input_shape[0] if rows is None else rows) * batch,) + tuple(self.input_shape[1:])
        x = torch.randn(shape, generator=gen, dtype=torch.float32)
        return x.to(device=self.device, dtype=self.dtype)

    def __call__(self, x):
        """Same as ``self.model(x)``."""
        return self.model(x)

    def __repr__(self) -> str:
        return f"Workload({self.name!r}, device={str(self.device)!r}, dtype={self.dtype})"


def available_devices() -> list[str]:
    """Device kinds torch can use here, best first ("mps", "cuda", then "cpu")."""
    import torch

    found = []
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    if torch.cuda.is_available():
        found.append("cuda")
    found.append("cpu")
    return found


def best_device() -> str:
    """"mps" if torch has MPS here, else "cuda" if it has CUDA, else "cpu"."""
    return available_devices()[0]


def _check_device(device: Any):
    """Return a torch.device for ``device``, or raise ValueError naming what is allowed."""
    import torch

    try:
        dev = device if isinstance(device, torch.device) else torch.device(str(device))
    except (RuntimeError, ValueError):
        raise ValueError(
            f"unknown device {device!r}; allowed: {', '.join(_DEVICE_KINDS)} (e.g. 'cuda:0')"
        ) from None
    if dev.type not in _DEVICE_KINDS:
        raise ValueError(f"unknown device {device!r}; allowed: {', '.join(_DEVICE_KINDS)}")
    present = available_devices()
    if dev.type not in present:
        raise ValueError(
            f"device {device!r} is not available here; available: {', '.join(present)}"
        )
    return dev


def _check_dtype(dtype: Any):
    """Return a floating torch.dtype for ``dtype`` (None means float32)."""
    import torch

    allowed = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
               "float64": torch.float64}
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        key = dtype.replace("torch.", "")
        if key in allowed:
            return allowed[key]
    elif dtype in allowed.values():
        return dtype
    raise ValueError(f"unsupported dtype {dtype!r}; allowed: None, {', '.join(allowed)}")


def _no_grad(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Wrap ``fn`` so that it runs under torch.no_grad in whichever thread calls it."""
    import torch

    def forward(x):
        with torch.no_grad():
            return fn(x)

    forward.__name__ = getattr(fn, "__name__", "forward")
    return forward


def _make_module(name: str):
    """Build the workload's module on cpu in float32 (None for matmul)."""
    from torch import nn

    if name == "small_mlp":
        return nn.Linear(256, 256)
    if name == "medium_mlp":
        return nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 512))
    # The seeds' transformers: feed-forward width 4 x d_model (1024 for the story's, not
    # torch's default 2048) and no dropout.
    if name == "story_transformer":
        layer = nn.TransformerEncoderLayer(d_model=256, nhead=4, dim_feedforward=1024, dropout=0.0,
                                           batch_first=True)
        return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    if name == "large_transformer":
        layer = nn.TransformerEncoderLayer(d_model=512, nhead=8, dim_feedforward=2048, dropout=0.0,
                                           batch_first=True)
        return nn.TransformerEncoder(layer, num_layers=6, enable_nested_tensor=False)
    return None


def build(name: str, device: Any = "cpu", dtype: Any = None, seed: int = 0) -> Workload:
    """Build workload ``name`` on ``device`` with reproducible weights from ``seed``.

    Raises ValueError for an unknown name, device or dtype, naming the allowed ones.
    """
    import torch

    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; allowed: {', '.join(WORKLOADS)}")
    dev = _check_device(device)
    dt = _check_dtype(dtype)
    # Seed a private copy of the RNG so building never disturbs the caller's.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = _make_module(name)
        if module is None:
            weight = torch.randn(512, 512) / 512 ** 0.5
    if module is not None:
        module = module.to(device=dev, dtype=dt).eval()
        model = _no_grad(module)
    else:
        weight = weight.to(device=dev, dtype=dt)

        def matmul(x):
            return torch.matmul(x, weight)

        model = _no_grad(matmul)
    return Workload(name, model, module, INPUT_SHAPES[name], dev, dt, seed)


def sync(device: Any = "cpu") -> None:
    """Wait for the device's queued work: cuda/mps synchronize, a no-op on cpu."""
    import torch

    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    if kind == "cuda":
        torch.cuda.synchronize(device)
    elif kind == "mps":
        torch.mps.synchronize()
    elif kind != "cpu":
        raise ValueError(f"unknown device {device!r}; allowed: {', '.join(_DEVICE_KINDS)}")
