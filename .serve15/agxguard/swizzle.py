"""Swizzle any Objective-C class's methods so each call runs under agxguard's lock.

Each hooked call takes the lock the current mode assigns to a driver call
(off: none; op: the process-wide driver lock; stream: the receiver's stream
lock, or its object lock; global: the global lock, re-entrant with
``agxguard.guard()``) and counts itself. Wrappers are chosen by the method's
ABI shape, read from its type encoding; a shape that cannot be forwarded
exactly is refused with a ValueError naming class, selector and encoding.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Union

from . import _C

#: Structs in a type encoding may nest this deep; deeper ones are refused (ValueError).
TYPE_ENCODING_MAX_DEPTH = 64  # csrc/objc/swizzle.c AGX_TYPE_MAX_DEPTH

_UNAVAILABLE = ("swizzling is unavailable in this build: agxguard._C was compiled without an "
                "Objective-C runtime (on Linux install gobjc and libobjc-12-dev, then rebuild)")


def swizzle_available() -> bool:
    """Whether this build has an Objective-C runtime (and so the swizzle engine)."""
    return bool(getattr(_C, "HAVE_OBJC", False))


def _need() -> None:
    if not swizzle_available():
        raise RuntimeError(_UNAVAILABLE)


def _name(value: Any, what: str) -> str:
    """`value` if it is a str without NUL, else a TypeError / ValueError naming it."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__} ({value!r:.80})")
    if "\x00" in value:
        raise ValueError(f"{what} must not contain a NUL character: {value!r:.80}")
    return value


def _selectors(selectors: Union[str, Iterable[str]]) -> List[str]:
    """One selector name or an iterable of them, checked (bytes is refused, not
    iterated into ints)."""
    if isinstance(selectors, (str, bytes, bytearray, memoryview)):
        return [_name(selectors, "a selector")]
    try:
        items = list(selectors)
    except TypeError:
        raise TypeError(f"selectors must be a str or an iterable of str, not {type(selectors).__name__}") from None
    return [_name(s, "a selector") for s in items]


def guard_methods(class_name: str, selectors: Union[str, Iterable[str]]) -> int:
    """Hook `selectors` of `class_name`; returns how many were newly installed
    (hooking one twice is a no-op). Raises ValueError for an unknown class or
    selector or an unsupported shape; earlier selectors stay hooked."""
    names = _selectors(selectors)
    _name(class_name, "class_name")
    _need()
    return sum(_C.swizzle_install(class_name, s) for s in names)


def unguard_methods(class_name: str, selectors: Optional[Union[str, Iterable[str]]] = None) -> int:
    """Restore the original implementations of `selectors` (all hooked ones of
    the class when None); returns how many hooks were removed."""
    names = None if selectors is None else _selectors(selectors)
    _name(class_name, "class_name")
    _need()
    if names is None:
        return int(_C.swizzle_uninstall(class_name, None))
    return sum(_C.swizzle_uninstall(class_name, s) for s in names)


def hooks() -> List[Dict[str, Any]]:
    """Every hook slot ever bound: class, selector, shape, active, added, calls."""
    _need()
    return list(_C.swizzle_hooks())


def hooked_calls(class_name: Optional[str] = None) -> int:
    """Total hooked calls counted (optionally for one class only)."""
    return sum(h["calls"] for h in hooks() if class_name is None or h["class"] == class_name)


def reset_counts() -> None:
    """Zero the hooks' call counts."""
    _need()
    _C.swizzle_reset_counts()


ABIS = ("sysv-x86_64", "aapcs64", "apple-arm64")


def shape_for(type_encoding: str, abi: Optional[str] = None) -> str:
    """The wrapper shape for an Objective-C method type encoding, e.g.
    ``shape_for("v@:{MTLSize=QQQ}{MTLSize=QQQ}") == "v(q3,q3)"``; ValueError if none,
    and for structs nested deeper than TYPE_ENCODING_MAX_DEPTH or a NUL in the text.

    abi: the calling convention whose rules apply, one of ABIS (None: this
    build's). Apple's arm64 refuses narrow arguments that would be passed on
    the stack; the others allow them."""
    _name(type_encoding, "a type encoding")
    _need()
    if abi is not None and abi not in ABIS:
        raise ValueError(f"abi {abi!r}: allowed values are {', '.join(ABIS)} or None")
    return str(_C.swizzle_shape_for(type_encoding, abi))
