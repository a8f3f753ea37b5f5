"""Backends for the suites, as seen from inside a child process.

A backend builds workloads, runs one request, and checks results. Torch devices
(``cpu``, ``cuda``, ``mps``) share one adapter over :mod:`agxguard.lab.workloads`; the driver
model (``model``) is a small adapter over :mod:`agxguard.lab.model`. The parent never touches
a backend: only children do, so that whatever a backend does to the process cannot
take the parent down.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Any, Dict, Optional

DEVICES = ("mps", "cuda", "cpu", "model")


def torch_devices_present() -> list:
    """Torch device kinds usable here, best first (imports torch)."""
    from .. import workloads
    return workloads.available_devices()


def model_available() -> bool:
    """True when the driver model is built into this agxguard."""
    try:
        model = importlib.import_module("agxguard.lab.model")
    except ImportError:
        return False
    try:
        return bool(model.available())
    except Exception:
        return False


def devices_present() -> list:
    """Every device kind usable here, best first."""
    found = []
    try:
        found += [d for d in torch_devices_present() if d != "cpu"]
        torch_ok = True
    except ImportError:
        torch_ok = False
    if model_available():
        found.append("model")
    if torch_ok:
        found.append("cpu")
    return found


def best_device() -> str:
    """mps, else cuda, else cpu (torch), else the driver model."""
    present = devices_present()
    for d in ("mps", "cuda", "cpu", "model"):
        if d in present:
            return d
    raise RuntimeError("no backend here: torch is not installed and the driver model is not built")


class TorchBackend:
    """A torch device: workloads from agxguard.lab.workloads, checks against CPU float64."""

    def __init__(self, device: str, cpu_threads: Optional[int] = None):
        import torch
        from .. import workloads
        self.torch = torch
        self.workloads = workloads
        self.device = device
        self.kind = device.split(":")[0]
        self._built: Dict[str, Any] = {}
        self._references: Dict[str, Any] = {}
        self._reference_outputs: Dict[Any, Any] = {}
        self._inputs: Dict[Any, Any] = {}
        if self.kind == "cpu" and cpu_threads:
            # Left alone by default, as the seeds do; an option (``torch_threads``) sets
            # torch's intra-op pool, e.g. 1 so that it does not compete with the workers.
            torch.set_num_threads(cpu_threads)

    def info(self) -> Dict[str, Any]:
        torch = self.torch
        out = {"backend": "torch", "torch": torch.__version__, "device": self.device,
               "torch_num_threads": torch.get_num_threads()}
        if self.kind == "cuda":
            out["device_name"] = torch.cuda.get_device_name(0)
            out["cuda"] = torch.version.cuda
            out["per_thread_streams"] = True
        elif self.kind == "mps":
            out["device_name"] = "Apple GPU (MPS)"
        else:
            import platform
            out["device_name"] = "CPU (%s)" % (platform.processor() or platform.machine())
        return out

    def workload(self, name: str, replica: int = 0):
        """Workload ``name``'s model number ``replica`` (built once each; every replica
        has the same weights, as the seeds' per-thread models loaded one state dict)."""
        key = (name, replica)
        if key not in self._built:
            self._built[key] = self.workloads.build(name, self.device)
        return self._built[key]

    def make_input(self, name: str, batch: int = 1, seed: int = 1, rows: Optional[int] = None):
        """The input for (name, batch, seed, rows), made once (so references can be cached)."""
        key = (name, batch, seed, rows)
        if key not in self._inputs:
            self._inputs[key] = self.workload(name).make_input(batch=batch, seed=seed, rows=rows)
        return self._inputs[key]

    @contextlib.contextmanager
    def worker(self, mode: str):
        """Entered once by each worker thread: ``op`` mode locks each torch op of the
        thread; on CUDA each worker has its own stream (the key of ``stream`` mode)."""
        import agxguard
        with contextlib.ExitStack() as stack:
            if self.kind == "cuda":
                stream = self.torch.cuda.Stream()
                stack.enter_context(self.torch.cuda.stream(stream))
            if mode == "op":
                stack.enter_context(agxguard.ops())
            yield

    def run(self, name: str, x, replica: int = 0):
        """One request on model ``replica``: the forward pass, then wait for the device
        (inside the region)."""
        y = self.workload(name, replica).model(x)
        if self.kind == "cuda":
            self.torch.cuda.current_stream().synchronize()
        elif self.kind == "mps":
            self.torch.mps.synchronize()
        return y

    def settle(self) -> None:
        """Wait for all queued device work (workers run on their own CUDA streams)."""
        if self.kind == "cuda":
            self.torch.cuda.synchronize()
        elif self.kind == "mps":
            self.torch.mps.synchronize()

    def reference(self, name: str, x):
        """The output for ``x`` on CPU in float64, same weights (cached per input object)."""
        key = (name, id(x))
        if key not in self._reference_outputs:
            if name not in self._references:
                self._references[name] = self.workloads.build(name, "cpu", dtype="float64")
            ref = self._references[name].model(x.detach().to("cpu", self.torch.float64))
            self._reference_outputs[key] = (x, ref)  # keeps x alive, so its id stays its own
        return self._reference_outputs[key][1]

    def max_abs_diff(self, a, b) -> float:
        a = a.detach().to("cpu", self.torch.float64)
        b = b.detach().to("cpu", self.torch.float64)
        return float((a - b).abs().max())

    def compare(self, name: str, x, y):
        """(correct?, max abs diff) of output ``y`` for input ``x`` against the reference."""
        if y is None:
            return False, None
        diff = self.max_abs_diff(y, self.reference(name, x))
        return diff <= self.tolerance(name), diff

    def same(self, a, b) -> float:
        """Max abs difference between two outputs."""
        return self.max_abs_diff(a, b)

    def finite(self, y) -> bool:
        return bool(self.torch.isfinite(y).all())

    def tolerance(self, name: str) -> float:
        """Largest max-abs-difference from the float64 reference that still counts as correct."""
        return {"float32": 1e-3, "float16": 5e-2, "bfloat16": 1e-1}.get(
            str(self.workload(name).dtype).replace("torch.", ""), 1e-3)


_backends: Dict[str, Any] = {}


def get_backend(device: str, options: Optional[Dict[str, Any]] = None):
    """The (cached) backend of ``device`` in this child process."""
    if device not in _backends:
        if device == "model":
            from .model_backend import ModelBackend
            _backends[device] = ModelBackend(options)
        else:
            _backends[device] = TorchBackend(device, (options or {}).get("torch_threads"))
    return _backends[device]
