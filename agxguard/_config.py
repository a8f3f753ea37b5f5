"""Configuration from the environment, read once at import.

A bad value never breaks ``import agxguard``: it gives a warning that names the
variable, the value and what is allowed, and the safe default is used.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Mapping, Optional

MODES = ("off", "op", "stream", "global")
DEFAULT_MODE = "op"
TIMEOUT_ACTIONS = ("raise", "abort")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


class ConfigWarning(RuntimeWarning):
    """An AGXGUARD_* environment variable had a bad value; a default was used."""


@dataclass(frozen=True)
class Config:
    mode: str = DEFAULT_MODE
    disable: bool = False
    warn_ms: Optional[float] = None
    timeout_ms: Optional[float] = None
    timeout_action: str = "raise"
    throttle: int = 0
    driver: Optional[str] = None


def _bad(name: str, value: str, allowed: str, default: object) -> None:
    warnings.warn(
        f"agxguard: ignoring {name}={value!r}: allowed {allowed}; using {default!r}",
        ConfigWarning,
        stacklevel=4,
    )


def _ms(env: Mapping[str, str], name: str) -> Optional[float]:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or value > 1e12:
        _bad(name, raw, "milliseconds >= 0 (0 = off)", None)
        return None
    return value or None


def from_env(env: Mapping[str, str] = os.environ) -> Config:
    """Read AGXGUARD_MODE, AGXGUARD_DISABLE, AGXGUARD_LOCK_WARN_MS,
    AGXGUARD_LOCK_TIMEOUT_MS, AGXGUARD_LOCK_TIMEOUT_ACTION, AGXGUARD_THROTTLE
    and AGXGUARD_DRIVER."""
    disable = False
    raw = env.get("AGXGUARD_DISABLE")
    if raw is not None:
        if raw.strip().lower() in _TRUE:
            disable = True
        elif raw.strip().lower() not in _FALSE:
            _bad("AGXGUARD_DISABLE", raw, "1/true/yes/on or 0/false/no/off", False)

    mode = "off" if disable else DEFAULT_MODE
    raw = env.get("AGXGUARD_MODE")
    if raw is not None and not disable:
        if raw.strip().lower() in MODES:
            mode = raw.strip().lower()
        else:
            _bad("AGXGUARD_MODE", raw, ", ".join(MODES), mode)

    action = "raise"
    raw = env.get("AGXGUARD_LOCK_TIMEOUT_ACTION")
    if raw is not None:
        if raw.strip().lower() in TIMEOUT_ACTIONS:
            action = raw.strip().lower()
        else:
            _bad("AGXGUARD_LOCK_TIMEOUT_ACTION", raw, ", ".join(TIMEOUT_ACTIONS), action)

    throttle = 0
    raw = env.get("AGXGUARD_THROTTLE")
    if raw is not None and raw.strip():
        try:
            throttle = int(raw)
        except ValueError:
            throttle = -1
        if throttle < 0:
            _bad("AGXGUARD_THROTTLE", raw, "an integer >= 0 (0 = no limit)", 0)
            throttle = 0

    driver = None
    raw = env.get("AGXGUARD_DRIVER")
    if raw is not None and raw.strip():
        if raw.strip().lower() in ("auto", "metal", "model", "none"):
            driver = raw.strip().lower()
        else:
            _bad("AGXGUARD_DRIVER", raw, "auto, metal, model, none", None)

    return Config(
        mode=mode,
        disable=disable,
        warn_ms=_ms(env, "AGXGUARD_LOCK_WARN_MS"),
        timeout_ms=_ms(env, "AGXGUARD_LOCK_TIMEOUT_MS"),
        timeout_action=action,
        throttle=throttle,
        driver=driver,
    )
