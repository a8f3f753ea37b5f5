"""How a suite shows its progress: lines in a terminal, a progress bar in Jupyter.

A suite's ``progress`` argument is a stream (one line per settled attempt is written to
it), ``None`` (silent), or one of :data:`CHOICES`: ``"auto"`` (a bar in Jupyter, lines on
stderr elsewhere), ``"bar"``, ``"lines"`` (on stderr), ``"none"``. A stream that is
Jupyter's own (ipykernel's ``OutStream``, what ``sys.stderr`` is in a notebook, so the
suites' default there) also gets a bar, updated in place, instead of one output per line.

The bar is ``tqdm.auto``'s where tqdm is installed (and, in Jupyter, ipywidgets, which
its notebook bar needs); otherwise in Jupyter an HTML ``<progress>`` in an IPython
display handle updated in place; outside Jupyter without tqdm, lines. The bar shows the
runs settled in the current mode, the crashes so far, and the last progress line; one bar
per mode. This module imports neither the suites nor any optional package at import.
"""
from __future__ import annotations

import html
import importlib
import sys
from typing import Any, Callable, List, Optional

CHOICES = ("auto", "bar", "lines", "none")
CRASH_OUTCOMES = ("signal", "abort", "hang")


def in_jupyter() -> bool:
    """True inside a Jupyter kernel (IPython's ZMQ shell); never imports IPython."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:
        return False
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def is_jupyter_stream(stream: Any) -> bool:
    """True for ipykernel's output streams (sys.stdout/sys.stderr inside a notebook)."""
    return type(stream).__module__.startswith("ipykernel")


def _tqdm() -> Optional[Callable[..., Any]]:
    """tqdm's bar class for here, or None: ``tqdm.auto`` where its bar can draw (in
    Jupyter it needs ipywidgets), else None."""
    try:
        if in_jupyter():
            importlib.import_module("ipywidgets")
        return importlib.import_module("tqdm.auto").tqdm
    except Exception:
        return None


def _display_tools():
    """IPython's ``display`` and ``HTML`` (a notebook has them)."""
    from IPython.display import HTML, display
    return display, HTML


class DisplayBar:
    """An HTML progress bar in one IPython display output, updated in place."""

    def __init__(self, total: int, desc: str):
        display, self._html = _display_tools()
        self.total, self.desc, self.n, self.note = total, desc, 0, ""
        self.handle = display(self._html(self.render()), display_id=True)

    def render(self) -> str:
        pct = 100.0 * self.n / self.total if self.total else 100.0
        return ('<div style="font-family:monospace"><b>%s</b> <progress value="%d" max="%d" '
                'style="width:40%%"></progress> %d/%d runs (%.0f%%)<br/>%s</div>'
                % (html.escape(self.desc), self.n, self.total, self.n, self.total, pct,
                   html.escape(self.note)))

    def update_to(self, n: int, note: str) -> None:
        self.n, self.note = n, note
        if self.handle is not None:
            self.handle.update(self._html(self.render()))

    def close(self) -> None:
        pass


class TqdmBar:
    """A tqdm bar with the same two calls as :class:`DisplayBar`."""

    def __init__(self, total: int, desc: str, tqdm: Callable[..., Any]):
        self.bar = tqdm(total=total, desc=desc, unit="run", leave=True, file=sys.stderr)

    def update_to(self, n: int, note: str) -> None:
        self.bar.set_postfix_str(note[-60:], refresh=False)
        self.bar.update(n - self.bar.n)

    def close(self) -> None:
        self.bar.close()


class _LastLine:
    """The stream a lines-progress writes to under a bar: keeps every line (``log``)."""

    def __init__(self):
        self.log: List[str] = []

    def write(self, text: str) -> None:
        self.log += [ln for ln in text.splitlines() if ln.strip()]

    def flush(self) -> None:
        pass


class ProgressBar:
    """A suite's progress as one bar per mode. ``lines`` is the suite's line-progress
    class (``common.Progress``): it still formats each line, and the last one is shown
    beside the bar (all of them are kept in ``log``)."""

    def __init__(self, suite: str, lines_cls, make_bar: Callable[[int, str], Any]):
        self.suite = suite
        self.sink = _LastLine()
        self.lines = lines_cls(suite, self.sink)
        self.make_bar = make_bar
        self.bar = None
        self.mode: Optional[str] = None
        self.settled: set = set()
        self.crashes = 0

    @property
    def log(self) -> List[str]:
        return self.sink.log

    def line(self, text: str) -> None:
        self.lines.line(text)
        if self.bar is not None:
            self.bar.update_to(len(self.settled), self._note())

    def _note(self) -> str:
        last = self.sink.log[-1] if self.sink.log else ""
        return ("%d crashes; " % self.crashes if self.crashes else "") + last.split("] ", 1)[-1]

    def attempt(self, rec, attempt, total: int, index: int) -> None:
        mode = rec.case.get("mode")
        if self.bar is None or mode != self.mode:
            if self.bar is not None:
                self.bar.close()
            self.mode, self.settled, self.crashes = mode, set(), 0
            self.bar = self.make_bar(total, "%s %s" % (self.suite, mode))
        self.settled.add(rec.case.get("id", index))
        if attempt.outcome in CRASH_OUTCOMES:
            self.crashes += 1
        self.lines.attempt(rec, attempt, total, index)
        self.bar.update_to(len(self.settled), self._note())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def make_progress(suite: str, progress: Any, lines_cls):
    """The progress display for ``progress`` (see the module docstring). ``lines_cls``
    is the suite's line-progress class, called as ``lines_cls(suite, stream)``."""
    if isinstance(progress, str):
        if progress not in CHOICES:
            raise ValueError("bad progress %r; allowed: %s, a stream, or None"
                             % (progress, ", ".join(CHOICES)))
        if progress == "none":
            return lines_cls(suite, None)
        if progress == "lines" or (progress == "auto" and not in_jupyter()):
            return lines_cls(suite, sys.stderr)
    elif not (progress is not None and is_jupyter_stream(progress)):
        return lines_cls(suite, progress)
    tqdm = _tqdm()
    if tqdm is not None:
        return ProgressBar(suite, lines_cls, lambda total, desc: TqdmBar(total, desc, tqdm))
    if in_jupyter() or is_jupyter_stream(progress):
        return ProgressBar(suite, lines_cls, DisplayBar)
    return lines_cls(suite, sys.stderr)  # "bar" asked for, outside Jupyter, without tqdm
