"""The AGX hook set: agxguard's locks on the GPU driver's own methods.

``import agxguard`` installs it when a supported driver is present (an Apple GPU
through Metal, or the driver model with ``AGXGUARD_DRIVER=model``) unless
``AGXGUARD_DISABLE=1``. Discovery makes a device, a command queue, a command
buffer and each kind of encoder and asks for their classes; one table of
(class role, selector, kind) rows is then hooked on them. Each hooked call takes
the lock the current mode assigns to a driver call; an encoder's stream is the
command queue of the command buffer that made it. Encoders are tracked (and
retained where their class supports it) from creation to ``endEncoding``, and a
commit first ends encoders still open on its buffer (commit safety).

Use ``agxguard.install()``, ``agxguard.status()`` ... (the package exports these
names; ``agxguard.hooks`` is the function that lists the hooks, so import this
module's other names with ``from agxguard.hooks import ...``).
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional

from . import _C

DRIVERS = ("metal", "model")
_NO_RUNTIME = ("this build has no Objective-C runtime, so no driver hooks (macOS: Xcode command line tools; "
               "Linux: gobjc and libobjc-12-dev, then rebuild)")
_NO_METAL = ("no supported driver: Metal exists only on macOS with an Apple GPU "
             "(set AGXGUARD_DRIVER=model to hook the driver model)")

_DISABLED = "disabled by AGXGUARD_DISABLE=1"
_NONE = "AGXGUARD_DRIVER=none"

# Why nothing is installed (None while installed); set by every install/uninstall.
_reason: Optional[str] = "not installed yet"


def _have_objc() -> bool:
    return bool(getattr(_C, "HAVE_OBJC", False))


def _pick(driver: Optional[str]) -> str:
    d = (driver or "auto").strip().lower()
    if d == "auto":
        if not _have_objc() or not getattr(_C, "METAL_SUPPORTED", False):
            raise RuntimeError(_NO_RUNTIME if not _have_objc() else _NO_METAL)
        return "metal"
    if d not in DRIVERS:
        raise ValueError(f"unknown driver {driver!r}; allowed: auto, {', '.join(DRIVERS)}")
    if not _have_objc():
        raise RuntimeError(_NO_RUNTIME)
    return d


def install(driver: Optional[str] = None) -> Dict[str, Any]:
    """Discover `driver` ('metal', 'model', or None/'auto': Metal where this
    build has it) and install the hook set on its classes; another driver's
    hooks are removed first. Returns {"driver", "new", "hooks", "skipped"}.
    Raises RuntimeError saying why when the driver is not there (no runtime, no
    Metal, no Apple GPU); status() keeps the reason."""
    global _reason
    try:
        d = _pick(driver)
        new = int(_C.hooks_install(d))
    except RuntimeError as e:
        if not installed():
            _reason = str(e)
        raise
    _reason = None
    rows = hooks()
    return {"driver": d, "new": new, "hooks": sum(r["installed"] for r in rows),
            "skipped": sum(not r["installed"] for r in rows)}


def uninstall() -> Dict[str, Any]:
    """Remove every hook of the set (originals restored exactly). Encoders open
    right now are forgotten, their retain kept (a bounded leak, never a use
    after free). Returns {"driver": what was installed, "removed"}."""
    global _reason
    if not _have_objc():
        return {"driver": None, "removed": 0}
    was = _C.hooks_driver()
    removed = int(_C.hooks_uninstall())
    _reason = "uninstalled (agxguard.uninstall())"
    return {"driver": was, "removed": removed}


def installed() -> bool:
    """Whether the hook set is installed now."""
    return _have_objc() and _C.hooks_driver() is not None


def hooks() -> List[Dict[str, Any]]:
    """The last install, one row per (class, selector): class, selector, role,
    kind, installed, and why it was skipped when it was not. Empty before any
    install."""
    return [dict(r) for r in _C.hooks_report()] if _have_objc() else []


def table() -> List[Dict[str, Any]]:
    """The hook set itself: selector, roles, kind, own_only, unlocked, one row each."""
    return [dict(r) for r in _C.hooks_table()] if _have_objc() else []


def status() -> Dict[str, Any]:
    """Driver found ('metal' | 'model' | None), why nothing is installed when
    nothing is, what discovery found, hook counts and the encoder lifecycle
    counters (encoders_created, encoders_ended, forced_ends, encoders_open, ...)."""
    out: Dict[str, Any] = {"driver": None, "installed": False, "reason": _reason,
                           "runtime": getattr(_C, "OBJC_RUNTIME", None),
                           "metal_supported": bool(getattr(_C, "METAL_SUPPORTED", False)),
                           "discovery": None, "hooks_installed": 0, "hooks_skipped": 0}
    if not _have_objc():
        # the missing runtime is the reason, unless the user turned hooks off anyway
        out["reason"] = _reason if _reason in (_DISABLED, _NONE) else _NO_RUNTIME
        return out
    rows = hooks()
    driver = _C.hooks_driver()
    out.update(driver=driver, installed=driver is not None, reason=None if driver else _reason,
               discovery=_C.hooks_discovery(), hooks_installed=sum(r["installed"] for r in rows),
               hooks_skipped=sum(not r["installed"] for r in rows))
    out.update(_C.hooks_lifecycle())
    return out


def reset_counts() -> None:
    """Zero the lifecycle counters (encoders_open stays: it is a state)."""
    if _have_objc():
        _C.hooks_reset_lifecycle()


def _install_at_import(config: Any) -> None:
    """What ``import agxguard`` does: install when a supported driver is present,
    unless disabled. Never raises; quiet unless a driver was asked for by name
    and could not be hooked (then one warning)."""
    global _reason
    if config.disable:
        _reason = _DISABLED
        return
    driver = config.driver or "auto"
    if driver == "none":
        _reason = _NONE
        return
    if not _have_objc():
        _reason = _NO_RUNTIME
    elif driver == "auto" and not getattr(_C, "METAL_SUPPORTED", False):
        _reason = _NO_METAL
    else:
        try:
            install(driver)
            return
        except Exception as e:  # import must not fail; the reason is kept for status()
            _reason = f"{type(e).__name__}: {e}" if not isinstance(e, RuntimeError) else str(e)
    if driver in DRIVERS:
        from ._config import ConfigWarning
        warnings.warn(f"agxguard: AGXGUARD_DRIVER={driver}: no hooks installed: {_reason}", ConfigWarning,
                      stacklevel=3)
