"""Pinning threads to CPUs (Linux): a speed-up for GIL handoffs on many-core VMs.

Threads that take turns on the GIL (a Batcher's clients and dispatcher, workers
under the ``op`` lock) hand over by waking a sleeping thread. On one core that is
a plain context switch; across cores of a VM it often means waking an idle
virtual CPU, which costs several times more.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Optional

try:
    from ._C import _affinity_changed
except ImportError:  # loaded without the C core (benchmarks/efficiency.py's fallback)
    def _affinity_changed() -> None:
        pass


def set_affinity(cpus: Iterable[int]) -> None:
    """Pin the calling thread to ``cpus`` and tell the C core, whose waits decide
    whether to spin from the thread's usable CPUs."""
    os.sched_setaffinity(0, cpus)
    _affinity_changed()


def check_pin_cpus(pin_cpus: Any) -> Optional[frozenset]:
    """Resolve ``pin_cpus`` to a frozenset of usable CPU numbers, or None."""
    if pin_cpus is None:
        return None
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("pin_cpus needs os.sched_setaffinity (Linux); this platform has none")
    try:
        cpus = frozenset(pin_cpus)
    except TypeError:
        cpus = None
    if not cpus or not all(isinstance(c, int) and not isinstance(c, bool) for c in cpus):
        raise TypeError(f"pin_cpus must be None or a non-empty collection of CPU numbers "
                        f"(ints), got {pin_cpus!r}")
    usable = os.sched_getaffinity(0)
    if not cpus <= usable:
        raise ValueError(f"pin_cpus {sorted(cpus)} includes CPUs this process may not use "
                         f"(allowed: {sorted(usable)})")
    return cpus
