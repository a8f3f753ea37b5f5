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

Import order does not matter: classes known by name (MetalPerformanceShaders'
``MPSCommandBuffer``) that appear when their framework loads later (``import
torch`` after ``import agxguard``) are hooked as they come, from the runtime's
image-load callback; ``rediscover()`` does the same on demand. Under Metal API
validation or frame capture (``MTL_DEBUG_LAYER=1``, Xcode) both the validation
layer's wrapper classes and the AGX classes under them are hooked.

The driver model is not part of the product: it lives in ``agxguard._model``,
the lab's C module (the model's Python wrapper imports it), which registers the
model with the product when it loads. ``AGXGUARD_DRIVER=model`` before that
waits for it: the hook set is installed the moment it registers. The product
never imports it.

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
_WAITING = ("AGXGUARD_DRIVER={driver}: waiting for the driver model to load (it is not part of the product: "
            "import agxguard._model, the lab's module); its hooks are installed when it registers")

# Why nothing is installed (None while installed); set by every install/uninstall.
_reason: Optional[str] = "not installed yet"
# A driver asked for by AGXGUARD_DRIVER that was not there yet; installed when it registers.
_waiting_for: Optional[str] = None


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
    global _reason, _waiting_for
    try:
        d = _pick(driver)
        _waiting_for = None
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
    after free). Returns {"driver": what was installed, "removed"}. A driver
    that AGXGUARD_DRIVER was waiting for is no longer installed when it loads."""
    global _reason, _waiting_for
    _waiting_for = None
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


def rediscover() -> Dict[str, Any]:
    """Look for the classes known by name again (MetalPerformanceShaders'
    ``MPSCommandBuffer``; the driver model's ``MPSModelCommandBuffer``) and hook
    those that appeared since the install, leaving installed hooks as they are.
    Image loads do this by themselves, shortly after the load (see ``status()
    ["images"]``); call it to be sure before work that must be hooked. Returns
    {"driver": installed driver or None, "new": hooks added}; nothing happens
    when no hook set is installed."""
    if not _have_objc():
        return {"driver": None, "new": 0}
    new = int(_C.hooks_rediscover())
    return {"driver": _C.hooks_driver(), "new": new}


def status() -> Dict[str, Any]:
    """Driver found ('metal' | 'model' | None), why nothing is installed when
    nothing is, what discovery found (classes per role, the device class and,
    under a debug layer, the driver's device under it), hook counts, image-load
    watching (``images``: mechanism, events, rediscoveries) and the encoder
    lifecycle counters (encoders_created, encoders_ended, forced_ends,
    encoders_open, ...)."""
    out: Dict[str, Any] = {"driver": None, "installed": False, "reason": _reason,
                           "runtime": getattr(_C, "OBJC_RUNTIME", None),
                           "metal_supported": bool(getattr(_C, "METAL_SUPPORTED", False)),
                           "discovery": None, "hooks_installed": 0, "hooks_skipped": 0, "images": None}
    if not _have_objc():
        # the missing runtime is the reason, unless the user turned hooks off anyway
        out["reason"] = _reason if _reason in (_DISABLED, _NONE) else _NO_RUNTIME
        return out
    rows = hooks()
    driver = _C.hooks_driver()
    out.update(driver=driver, installed=driver is not None, reason=None if driver else _reason,
               discovery=_C.hooks_discovery(), hooks_installed=sum(r["installed"] for r in rows),
               hooks_skipped=sum(not r["installed"] for r in rows), images=dict(_C.hooks_images()))
    out.update(_C.hooks_lifecycle())
    return out


def reset_counts() -> None:
    """Zero the lifecycle counters (encoders_open stays: it is a state)."""
    if _have_objc():
        _C.hooks_reset_lifecycle()


def _metal_gpus() -> List[str]:
    """The Metal devices of this Mac (class names); [] off macOS or when the
    build cannot ask."""
    try:
        return list(_C.metal_devices()) if getattr(_C, "METAL_SUPPORTED", False) else []
    except Exception:  # the warning below is best effort; import must not fail
        return []


def _install_at_import(config: Any) -> None:
    """What ``import agxguard`` does: install when a supported driver is present,
    unless disabled. Never raises. Quiet unless hooks were expected and none
    could be installed: a driver asked for by name (ConfigWarning), or a Mac
    with a GPU where the automatic install failed (RuntimeWarning with the
    reason: a user there believes agxguard is guarding the driver)."""
    global _reason
    if config.disable:
        _reason = _DISABLED
        return
    driver = config.driver or "auto"
    if driver == "none":
        _reason = _NONE
        return
    global _waiting_for
    if not _have_objc():
        _reason = _NO_RUNTIME
    elif driver == "auto" and not getattr(_C, "METAL_SUPPORTED", False):
        _reason = _NO_METAL
    elif driver == "model" and not _C.hooks_driver_present("model"):
        _waiting_for, _reason = "model", _WAITING.format(driver=driver)
        return
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
    elif _have_objc() and getattr(_C, "METAL_SUPPORTED", False):
        gpus = _metal_gpus()
        if gpus:
            warnings.warn(f"agxguard: no driver hooks installed on this Mac with a GPU ({', '.join(gpus)}): "
                          f"{_reason}. The GPU driver is not guarded; agxguard.status() has the details "
                          f"(AGXGUARD_DRIVER=none silences this)", RuntimeWarning, stacklevel=3)


def _driver_registered(driver: str) -> None:
    """Called by agxguard._model once it has registered the driver model with
    the product: install the hook set now when AGXGUARD_DRIVER asked for that
    driver before it was there. Never raises (it runs inside that import); a
    failure warns as the import-time install does and is kept for status()."""
    global _reason
    if _waiting_for != driver:
        return
    try:
        install(driver)
    except Exception as e:  # the importing code must not fail for the hooks
        _reason = f"{type(e).__name__}: {e}" if not isinstance(e, RuntimeError) else str(e)
        from ._config import ConfigWarning
        warnings.warn(f"agxguard: AGXGUARD_DRIVER={driver}: no hooks installed: {_reason}", ConfigWarning,
                      stacklevel=2)
