"""The torch side of ``op`` granularity: a function mode that locks each op."""
from __future__ import annotations

import types
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch.overrides import TorchFunctionMode

from . import _C

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


class GuardedOps(TorchFunctionMode):
    """Runs every torch function of the entering thread under the lock that the
    current mode assigns to one op (off: none, op: the op lock, stream: the
    stream's lock, global: the global lock).

    The hot path is C: each instance's ``__torch_function__`` is the builtin
    agxguard._C.torch_function bound to it, so lock-call-unlock runs without a
    Python frame. Metadata reads (attribute getters, dim/size/stride/numel,
    grad-mode switches) reach no device and run without the lock.

    Any torch function mode, this one included, makes torch skip its fused
    transformer fast path (nn.TransformerEncoderLayer falls back to separate
    ops), so ``op`` mode runs more kernels for transformer models."""

    def __init__(self) -> None:
        super().__init__()
        self.__torch_function__ = types.MethodType(_C.torch_function, self)  # type: ignore[method-assign]

    def __torch_function__(self, func: Callable[..., Any], types: Sequence[type],
                           args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None) -> Any:
        return _C.torch_function(self, func, types, tuple(args), kwargs)
