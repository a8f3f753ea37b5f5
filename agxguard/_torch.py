"""The torch side of ``op`` granularity: a function mode that locks each op."""
from __future__ import annotations

import types
from typing import Any, Callable, Dict, Optional, Sequence

from torch.overrides import TorchFunctionMode

from . import _C


class GuardedOps(TorchFunctionMode):
    """Runs every torch function of the entering thread under the lock that the
    current mode assigns to one op (off: none, op: the op lock, stream: the
    stream's lock, global: the global lock).

    The hot path is C: each instance's ``__torch_function__`` is the builtin
    agxguard._C.torch_function bound to it, so lock-call-unlock runs without a
    Python frame.

    Any torch function mode, this one included, makes torch skip its fused
    transformer fast path (nn.TransformerEncoderLayer falls back to separate
    ops), so ``op`` mode runs more kernels for transformer models."""

    def __init__(self) -> None:
        super().__init__()
        self.__torch_function__ = types.MethodType(_C.torch_function, self)  # type: ignore[method-assign]

    def __torch_function__(self, func: Callable[..., Any], types: Sequence[type],
                           args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None) -> Any:
        return _C.torch_function(self, func, types, tuple(args), kwargs)
