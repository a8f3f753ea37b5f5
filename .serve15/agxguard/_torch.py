"""The torch side of ``op`` granularity: a function mode (or a dispatch mode) that locks each op."""
from __future__ import annotations

import os
import types
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from . import _C
from ._affinity import check_pin_cpus, set_affinity

# Torch functions that read metadata or flip thread-local state and reach no
# device, so they run without the op lock: tensor attribute getters (shape,
# dtype, device, .T, ...: all method-wrappers of getset descriptors) and these.
_METADATA = frozenset(
    f for f in (
        getattr(torch.Tensor, name, None)
        for name in ("dim", "size", "stride", "numel", "element_size", "is_contiguous",
                     "is_floating_point", "is_complex", "get_device", "__len__", "ndimension",
                     "nelement", "storage_offset")
    ) if f is not None
) | frozenset(
    f for f in (getattr(torch._C, name, None) for name in ("_set_grad_enabled", "_get_tracing_state"))
    if f is not None
) | frozenset(
    f for f in (getattr(torch, name, None) for name in ("is_grad_enabled", "is_autocast_enabled",
                                                         "is_inference_mode_enabled"))
    if f is not None
)
_C._set_op_passthrough(type(torch.Tensor.shape.__get__), _METADATA)


class _Pinned:
    """Pins the entering thread to ``pin_cpus`` (Linux) while a mode is active and
    restores its affinity on exit; mixed into both guarded modes."""

    def __init__(self, pin_cpus: Any = None) -> None:
        super().__init__()
        self._pin = check_pin_cpus(pin_cpus)
        self._saved_affinity: Optional[frozenset] = None

    def __enter__(self) -> Any:
        if self._pin is not None:
            self._saved_affinity = frozenset(os.sched_getaffinity(0))
            set_affinity(self._pin)
        try:
            return super().__enter__()
        except BaseException:
            self._restore_affinity()
            raise

    def __exit__(self, *exc: Any) -> Any:
        try:
            return super().__exit__(*exc)
        finally:
            self._restore_affinity()

    def _restore_affinity(self) -> None:
        if self._saved_affinity is not None:
            set_affinity(self._saved_affinity)
            self._saved_affinity = None


class GuardedOps(_Pinned, TorchFunctionMode):
    """Runs every torch function of the entering thread under the lock that the
    current mode assigns to one op (off: none, op: the op lock, stream: the
    stream's lock, global: the global lock).

    The hot path is C: each instance's ``__torch_function__`` is the builtin
    agxguard._C.torch_function bound to it, so lock-call-unlock runs without a
    Python frame. Metadata reads (attribute getters, dim/size/stride/numel,
    grad-mode switches) reach no device and run without the lock.

    Any torch function mode, this one included, makes torch skip its fused
    transformer fast path (nn.TransformerEncoderLayer falls back to separate
    ops), so ``op`` mode runs more kernels for transformer models.

    ``pin_cpus`` (Linux): pin the entering thread to these CPUs while the mode is
    active, restoring its affinity on exit. Workers under the op lock hand it over
    through the GIL; on one core that is a context switch instead of waking an idle
    virtual CPU (on the H200 VM: 0.46x -> 0.86x of free threads for small_mlp)."""

    def __init__(self, pin_cpus: Any = None) -> None:
        super().__init__(pin_cpus)
        self.__torch_function__ = types.MethodType(_C.torch_function, self)  # type: ignore[method-assign]

    def __torch_function__(self, func: Callable[..., Any], types: Sequence[type],
                           args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None) -> Any:
        return _C.torch_function(self, func, types, tuple(args), kwargs)


class GuardedDispatch(_Pinned, TorchDispatchMode):
    """The same lock per op one level lower: every ATen operator that reaches
    torch's Python dispatch key on the entering thread (below autograd, after
    composite operators have been decomposed) runs under the lock the current mode
    assigns to one op. An operator's kernel runs inside its lock, with whatever it
    calls in C++, so a fused operator (the transformer fast path, which torch keeps
    under a dispatch mode but skips under any function mode) is one locked call.
    The hot path is the same C builtin as GuardedOps'."""

    def __init__(self, pin_cpus: Any = None) -> None:
        super().__init__(pin_cpus)
        self.__torch_dispatch__ = types.MethodType(_C.torch_function, self)  # type: ignore[method-assign]

    def __torch_dispatch__(self, func: Callable[..., Any], types: Sequence[type],
                           args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None) -> Any:
        return _C.torch_function(self, func, types, tuple(args), kwargs)
