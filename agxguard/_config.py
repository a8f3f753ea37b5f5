"""Configuration from the environment, read once at import.

A bad value never breaks ``import agxguard``: it gives a warning that names the
variable, the value and what is allowed, and the safe default is used.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Mapping, Optional

from ._C import MODES  # the one list of modes is the C core's

DEFAULT_MODE = "op"
TIMEOUT_ACTIONS = ("raise", "abort")
#: The throttle's range (0 = no limit); the C core enforces the same bounds.
THROTTLE_MAX = 1_000_000
#: A lock wait limit (warn or timeout) is 0 / unset (off) or from WAIT_MS_MIN (1 us)
#: to WAIT_MS_MAX milliseconds; the C core enforces the same bounds.
WAIT_MS_MIN = 0.001
WAIT_MS_MAX = 1e12
WAIT_MS_RANGE = f"None or 0 (off), or milliseconds from {WAIT_MS_MIN:g} to {WAIT_MS_MAX:g}"
THROTTLE_RANGE = f"an integer from 0 (no limit) to {THROTTLE_MAX}"
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


def _shown(value: str, limit: int = 60) -> str:
    """repr(value), shortened in the middle when long (a warning stays one line)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit // 2] + "..." + text[-limit // 2:]


def _bad(name: str, value: str, allowed: str, default: object) -> None:
    warnings.warn(
        f"agxguard: ignoring {name}={_shown(value)}: allowed {allowed}; using {default!r}",
        ConfigWarning,
        stacklevel=4,
    )


def _ms(env: Mapping[str, str], name: str) -> Optional[float]:
    """A wait limit in milliseconds: unset, empty or 0 is off (None); anything that is
    not a number in WAIT_MS_MIN..WAIT_MS_MAX (a tiny positive value would round to no
    limit at all) warns and gives None."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = float(raw)
    except ValueError:  # not a number (float() of any string raises nothing else)
        value = float("nan")
    if value == 0:
        return None
    if not WAIT_MS_MIN <= value <= WAIT_MS_MAX:  # NaN and +-inf fail this too
        _bad(name, raw, WAIT_MS_RANGE, None)
        return None
    return value


def _throttle(env: Mapping[str, str]) -> int:
    """AGXGUARD_THROTTLE: an integer from 0 to THROTTLE_MAX, else a warning and 0."""
    raw = env.get("AGXGUARD_THROTTLE")
    if raw is None or not raw.strip():
        return 0
    try:
        value = int(raw)
    except ValueError:  # not an integer, or more digits than int() converts
        value = -1
    if not 0 <= value <= THROTTLE_MAX:
        _bad("AGXGUARD_THROTTLE", raw, THROTTLE_RANGE, 0)
        return 0
    return value


def from_env(env: Mapping[str, str] = os.environ) -> Config:
    """Read AGXGUARD_MODE, AGXGUARD_DISABLE, AGXGUARD_LOCK_WARN_MS,
    AGXGUARD_LOCK_TIMEOUT_MS, AGXGUARD_LOCK_TIMEOUT_ACTION, AGXGUARD_THROTTLE
    and AGXGUARD_DRIVER. Never raises: each bad value warns (ConfigWarning) and
    its default is used."""
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
        throttle=_throttle(env),
        driver=driver,
    )
