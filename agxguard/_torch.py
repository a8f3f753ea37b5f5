"""The torch side of ``op`` granularity: a function mode that locks each op."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

from torch.overrides import TorchFunctionMode

from . import _C

_call_guarded = _C.Guard(site="call").call


class GuardedOps(TorchFunctionMode):
    """Runs every torch function of the entering thread under the lock that the
    current mode assigns to one op (off: none, op: the op lock, stream: the
    stream's lock, global: the global lock). The lock-and-call is one C call."""

    def __torch_function__(self, func: Callable[..., Any], types: Sequence[type],
                           args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None) -> Any:
        return _call_guarded(func, tuple(args), kwargs)
