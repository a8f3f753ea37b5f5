"""The driver model as a suite backend (see agxguard.lab.model).

A request is the model's MPS op pattern (command buffer, encoder, pipeline, buffers,
dispatch, end, commit, wait) computing ``y = a*x + y`` on fresh buffers; the model
checks the arithmetic and says whether the result is right. Each workload maps to a
vector length, and a batch of N requests to N times that length in one op. All
threads share queue 0, as PyTorch's MPS threads share one command queue; every
``internal_every``-th request of a thread takes the model's internal dispatch path,
which bypasses any swizzled method (as kernel dispatch does in the AGX driver).

These are driver-model figures (a test double in C on this machine's CPU), never
Apple GPU figures.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Dict, Optional, Tuple

# Vector length of one request per workload: the model's stand-in for the work size.
LENGTHS = {"small_mlp": 256, "medium_mlp": 1024, "story_transformer": 2048,
           "large_transformer": 8192, "matmul": 4096}
DEFAULTS = {"bugs": True, "window_yields": 1, "window_spins": 0, "internal_every": 4}


class ModelBackend:
    """Adapter from the suites' backend interface to agxguard.lab.model."""

    kind = "model"

    def __init__(self, options: Optional[Dict[str, Any]] = None):
        from .. import model
        self.model = model
        self.options = dict(DEFAULTS, **(options or {}))
        model.set_bugs(bool(self.options["bugs"]), window_yields=int(self.options["window_yields"]),
                       window_spins=int(self.options["window_spins"]))
        # The hook set is installed in every mode, as the seed fix's dylib was loaded in
        # every run; the mode decides what the hooks lock (off: nothing).
        self.hooks = model.hook()
        self._local = threading.local()

    def info(self) -> Dict[str, Any]:
        return {"backend": "driver model", "device_name": "agxguard driver model (test double in C, "
                "not an Apple GPU)", "model_config": self.model.config(),
                "model_options": self.options, "model_classes": self.model.classes()}

    def make_input(self, name: str, batch: int = 1, seed: int = 1, rows: Optional[int] = None) -> Dict[str, Any]:
        """A request of ``batch`` times the workload's length (``rows`` is a torch shape
        detail with no counterpart here)."""
        return {"length": LENGTHS.get(name, 1024) * batch, "a": 1.0 + 0.25 * seed}

    @contextlib.contextmanager
    def worker(self, mode: str):
        """Per worker thread: count its requests (for the internal-path cadence)."""
        self._local.n = 0
        yield

    def run(self, name: str, x: Dict[str, Any], replica: int = 0) -> bool:
        """One request (the model has no weights: ``replica`` changes nothing)."""
        every = int(self.options["internal_every"] or 0)
        n = getattr(self._local, "n", 0)
        self._local.n = n + 1
        internal = bool(every) and n % every == every - 1
        return self.model.run_op(queue=0, a=x["a"], length=x["length"], internal=internal)

    # The model checks its own arithmetic: a request's output is whether it was right.
    def finite(self, y: Any) -> bool:
        return y is True

    def compare(self, name: str, x: Any, y: Any) -> Tuple[bool, Optional[float]]:
        return y is True, None

    def same(self, a: Any, b: Any) -> float:
        return 0.0 if (a is True and b is True) else float("inf")
