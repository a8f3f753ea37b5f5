"""The child runner: run work in child processes and record what really happened.

The one runner of the project: the pytest plugin (``agxguard_isolated``), the lab's
suites and the driver model's crash counts all use it, and every report says what
happened in the words of :data:`OUTCOMES`. It needs no C extension (the child side,
``agxguard/_runner_child.py``, runs as a script). Every case runs in a child process;
the parent classifies each attempt as one of:

- ``passed``: the case returned;
- ``failed``: the case raised (a Python exception, or a check that did not hold);
- ``signal``: the child died of a signal (``SIGSEGV``, ``SIGBUS``, ...);
- ``abort``: the child died of ``SIGABRT``; the tail of its stderr says why;
- ``hang``: the case ran past its watchdog; the child's Python stacks are dumped
  (faulthandler on ``SIGUSR1``) before it is killed.

Several cases can share one child (cheaper than a process each); the child streams a
``start`` and a ``done`` line per case, so a crash is charged to the case that was
running, and the cases after it go on in a fresh child. A case that does not pass is
retried in a fresh child up to ``retries`` times; every attempt is kept, so a retry never
hides a crash, and both the raw pass rate and the pass rate after retries can be reported.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

OUTCOMES = ("passed", "failed", "signal", "abort", "hang")  # every attempt ends in one of these
CRASHES = ("signal", "abort", "hang")  # the outcomes that are crashes

_CHILD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_runner_child.py")
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HEAD_CHARS = 6000  # a crash report keeps this much of a child's output from the start
_TAIL_CHARS = 4000  # and this much from the end
_STACK_DUMP_GRACE_S = 2.0


class CheckFailed(Exception):
    """Raised inside a case when a check does not hold; ``data`` (JSON) is kept as the result."""

    def __init__(self, message: str, data: Any = None):
        super().__init__(message)
        self.agxguard_result = data


@dataclass
class Attempt:
    """One try of one case in one child process."""

    outcome: str  # one of OUTCOMES
    value: Any = None
    error: Optional[str] = None
    traceback: Optional[str] = None
    signal: Optional[str] = None
    returncode: Optional[int] = None
    stderr_tail: Optional[str] = None
    last_words: Optional[str] = None  # the last lines printed before a crash (see abort_message)
    stacks: Optional[str] = None
    duration_s: float = 0.0
    pid: Optional[int] = None
    crash_reports_new: Optional[int] = None
    child_exit: Optional[str] = None  # set when the child died after this, its last case

    @property
    def crashed(self) -> bool:
        return self.outcome in CRASHES

    @property
    def message(self) -> str:
        """What the child last said about it: the error of a failed case, the last line
        printed before a crash (without faulthandler's dump), or "" when it passed."""
        if self.outcome == "passed":
            return ""
        last = self.last_words if self.last_words is not None else abort_message(self.stderr_tail or "")
        if self.outcome in ("signal", "abort") and last:
            return last.splitlines()[-1]
        return self.error or last

    def describe(self) -> str:
        """One line: what happened."""
        if self.outcome == "signal":
            return "crashed with %s" % self.signal
        if self.outcome == "abort":
            message = self.last_words if self.last_words is not None else abort_message(self.stderr_tail or "")
            return "aborted (SIGABRT)" + (": " + message.splitlines()[-1] if message else "")
        if self.outcome == "hang":
            return "hung (watchdog after %.1fs)" % self.duration_s
        if self.outcome == "failed":
            return "failed: %s" % (self.error or "exit status %s" % self.returncode)
        return "passed"


@dataclass
class CaseRecord:
    """A case and every attempt made at it."""

    case: Dict[str, Any]
    attempts: List[Attempt] = field(default_factory=list)

    @property
    def outcome(self) -> str:
        """Outcome of the last attempt (``passed`` if any attempt passed)."""
        return "passed" if self.passed else (self.attempts[-1].outcome if self.attempts else "failed")

    @property
    def raw_passed(self) -> bool:
        """Passed on the first attempt."""
        return bool(self.attempts) and self.attempts[0].outcome == "passed"

    @property
    def passed(self) -> bool:
        """Passed on some attempt (the pass after retries)."""
        return any(a.outcome == "passed" for a in self.attempts)

    @property
    def retries(self) -> int:
        return max(0, len(self.attempts) - 1)

    @property
    def value(self) -> Any:
        """Result of the passing attempt, else of the last attempt."""
        for a in self.attempts:
            if a.outcome == "passed":
                return a.value
        return self.attempts[-1].value if self.attempts else None

    @property
    def crashes(self) -> Dict[str, int]:
        """Crashes by kind over all attempts (retried or not)."""
        out = {k: 0 for k in CRASHES}
        for a in self.attempts:
            if a.outcome in out:
                out[a.outcome] += 1
        return out

    def to_dict(self) -> Dict[str, Any]:
        return {
            "case": self.case,
            "outcome": self.outcome,
            "raw_passed": self.raw_passed,
            "passed": self.passed,
            "retries": self.retries,
            "crashes": self.crashes,
            "value": self.value,
            "attempts": [asdict(a) for a in self.attempts],
        }


def abort_message(output: str) -> str:
    """What a process printed just before aborting (without faulthandler's stack dump)."""
    cut = output.find("Fatal Python error")
    text = output[:cut] if cut >= 0 else output
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(lines[-5:])


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return "signal %d" % signum


# -- macOS crash reports ---------------------------------------------------------------

def crash_report_dir() -> Optional[str]:
    """The folder where macOS writes crash reports, or None off macOS."""
    if sys.platform != "darwin":
        return None
    return os.path.expanduser("~/Library/Logs/DiagnosticReports")


def crash_report_names() -> Optional[set]:
    """Names of the crash reports present now (None where the OS keeps none we can read)."""
    folder = crash_report_dir()
    if folder is None:
        return None
    try:
        return {n for n in os.listdir(folder) if n.endswith((".ips", ".crash"))}
    except OSError:
        return set()


def count_new_crash_reports(before: Optional[set]) -> Optional[int]:
    after = crash_report_names()
    if before is None or after is None:
        return None
    return len(after - before)


# -- running children ------------------------------------------------------------------

def target_name(target: Union[str, Callable]) -> str:
    """``module:qualname`` of a module-level function (what the child imports)."""
    if isinstance(target, str):
        if ":" not in target:
            raise ValueError("target %r must look like 'module:function'" % target)
        return target
    module = getattr(target, "__module__", None)
    qualname = getattr(target, "__qualname__", None)
    if not module or not qualname or "<locals>" in qualname or module == "__main__":
        raise ValueError("target %r must be a module-level function importable by a child "
                         "process (not a lambda, a local function or one in __main__)" % target)
    return "%s:%s" % (module, qualname)


class _Child:
    """One child process running a list of cases; the parent reads its progress file."""

    def __init__(self, target: str, items: List[Dict[str, Any]], workdir: str, env, cwd):
        self.items = items
        tag = "%d-%d" % (os.getpid(), int(time.monotonic() * 1e6))
        self.spec_path = os.path.join(workdir, "spec-%s.json" % tag)
        self.progress_path = os.path.join(workdir, "progress-%s.jsonl" % tag)
        self.log_path = os.path.join(workdir, "log-%s.txt" % tag)
        sys_path = [_PACKAGE_PARENT] + [os.path.abspath(p or os.curdir) for p in sys.path]
        with open(self.spec_path, "w") as f:
            json.dump({"target": target, "cases": items, "sys_path": sys_path}, f)
        open(self.progress_path, "w").close()
        self.log = open(self.log_path, "w+b")
        child_env = dict(os.environ if env is None else env)
        child_env.setdefault("PYTHONFAULTHANDLER", "1")
        child_env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, _CHILD_SCRIPT, self.spec_path, self.progress_path],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            env=child_env, cwd=cwd, start_new_session=(os.name == "posix"))
        self._offset = 0
        self._partial = b""

    def events(self) -> List[Dict[str, Any]]:
        """New complete lines of the progress file."""
        with open(self.progress_path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        out = []
        for line in lines:
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def log_size(self) -> int:
        self.log.flush()
        return os.fstat(self.log.fileno()).st_size

    def log_text(self, start: int = 0) -> str:
        self.log.flush()
        self.log.seek(start)
        return self.log.read().decode("utf-8", "replace")

    def dump_stacks(self) -> str:
        """Ask the child for its Python stacks (faulthandler on SIGUSR1); return them."""
        if not hasattr(signal, "SIGUSR1") or self.proc.poll() is not None:
            return ""
        start = self.log_size()
        try:
            self.proc.send_signal(signal.SIGUSR1)
        except ProcessLookupError:
            return ""
        deadline = time.monotonic() + _STACK_DUMP_GRACE_S
        last, stable_since = start, time.monotonic()
        while time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.05)
            size = self.log_size()
            if size != last:
                last, stable_since = size, time.monotonic()
            elif size > start and time.monotonic() - stable_since > 0.2:
                break
        return self.log_text(start)

    def kill(self) -> None:
        if self.proc.poll() is not None:
            return
        try:
            if os.name == "posix":
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.kill()
        except (ProcessLookupError, PermissionError):
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        self.kill()
        self.log.close()
        for p in (self.spec_path, self.progress_path, self.log_path):
            try:
                os.unlink(p)
            except OSError:
                pass


def clip(text: str, head: int = _HEAD_CHARS, tail: int = _TAIL_CHARS) -> str:
    """`text` whole if it is short; else its first `head` and last `tail` characters,
    each cut at a line boundary, with a marker between them saying how much was cut. A
    crashed child's first lines hold the fatal error and the faulting frames, its last
    lines what it printed at the end: a report needs both."""
    if len(text) <= head + tail:
        return text
    h = text[:head]
    h = h[:h.rfind("\n") + 1] or h
    t = text[-tail:]
    t = t[t.find("\n") + 1:] or t
    return f"{h}[... {len(text) - len(h) - len(t)} characters cut ...]\n{t}"



def run_cases(target: Union[str, Callable], cases: Sequence[Dict[str, Any]], *,
              timeout: float = 300.0, startup_timeout: float = 120.0, retries: int = 0,
              env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None,
              on_record: Optional[Callable[[CaseRecord], None]] = None,
              on_attempt: Optional[Callable[[CaseRecord, Attempt], None]] = None) -> List[CaseRecord]:
    """Run ``target(case)`` for each case in child processes; return one record per case.

    ``target`` is a module-level function (or ``"module:function"``) taking a JSON case
    and returning a JSON result. ``timeout`` is the per-case watchdog, ``startup_timeout``
    the limit for a child to import its target. ``on_attempt`` is called after every
    attempt and ``on_record`` once a case is settled (passed or out of retries): the
    place to write a report, so that nothing already measured is lost.
    """
    name = target_name(target)
    records = [CaseRecord(case=dict(c)) for c in cases]
    pending = list(range(len(records)))
    settled = set()
    with tempfile.TemporaryDirectory(prefix="agxguard-runner-") as workdir:
        while pending:
            items = [{"index": i, "case": records[i].case} for i in pending]
            pending = []
            attempted = _run_one_child(name, items, records, workdir, env, cwd,
                                       timeout, startup_timeout, on_attempt)
            for i in [it["index"] for it in items]:
                rec = records[i]
                if i not in attempted:
                    pending.append(i)  # never started: not an attempt, run it again
                elif not rec.passed and len(rec.attempts) <= retries:
                    pending.append(i)  # retried in a fresh child
                elif i not in settled:
                    settled.add(i)
                    if on_record is not None:
                        on_record(rec)
    return records


def _run_one_child(name, items, records, workdir, env, cwd, timeout, startup_timeout,
                   on_attempt) -> set:
    """Run ``items`` in one child; append an attempt to each case it started; return their indices."""
    before_reports = crash_report_names()
    child = _Child(name, items, workdir, env, cwd)
    attempted = set()
    current = None  # index of the case running now
    started_at = time.monotonic()
    current_since = started_at
    hung = False
    stacks = None

    finished_order = []

    def finish(index, attempt):
        attempted.add(index)
        finished_order.append(index)
        records[index].attempts.append(attempt)
        if on_attempt is not None:
            on_attempt(records[index], attempt)

    def finish_done(ev):
        """Record the child's "done" event ``ev`` as an attempt of its case."""
        finish(ev["index"], Attempt(
            outcome=ev.get("outcome", "failed"), value=ev.get("value"),
            error=ev.get("error"), traceback=ev.get("traceback"),
            duration_s=round(time.monotonic() - current_since, 4),
            pid=child.proc.pid))

    try:
        while True:
            for ev in child.events():
                kind = ev.get("event")
                if kind == "start":
                    current, current_since = ev["index"], time.monotonic()
                elif kind == "done":
                    finish_done(ev)
                    current = None
                    current_since = time.monotonic()
            if child.proc.poll() is not None:
                # Read the last lines written before the exit.
                for ev in child.events():
                    if ev.get("event") == "done" and ev["index"] not in attempted:
                        finish_done(ev)
                        current = None
                    elif ev.get("event") == "start":
                        current, current_since = ev["index"], time.monotonic()
                break
            limit = timeout if current is not None else startup_timeout
            if time.monotonic() - current_since > limit:
                hung = True
                stacks = child.dump_stacks()
                child.kill()
                break
            time.sleep(0.02)
        rc = child.proc.wait()
        duration = round(time.monotonic() - current_since, 4)
        output = child.log_text()
        victim = current
        if victim is None and len(attempted) < len(items) and (hung or rc != 0):
            # Died (or stalled) before starting a case: charge the next case, so that
            # a child that cannot even start still ends in a result.
            victim = next(it["index"] for it in items if it["index"] not in attempted)
        if victim is not None:
            attempt = Attempt(outcome="failed", returncode=rc, duration_s=duration,
                              pid=child.proc.pid, stderr_tail=clip(output),
                              last_words=abort_message(output))  # from the whole output: the stack
                                                                # dump after them can outgrow the tail
            if hung:
                attempt.outcome = "hang"
                attempt.signal = "SIGKILL"
                attempt.stacks = stacks or "(no Python stacks could be dumped)"
                attempt.error = "no result after %.1fs (watchdog)" % duration
            elif rc < 0 and -rc == signal.SIGABRT:
                attempt.outcome, attempt.signal = "abort", "SIGABRT"
                attempt.error = "child aborted"
            elif rc < 0:
                attempt.outcome, attempt.signal = "signal", signal_name(-rc)
                attempt.error = "child killed by %s" % attempt.signal
            else:
                attempt.error = "child exited with status %d before finishing the case" % rc
            attempt.crash_reports_new = count_new_crash_reports(before_reports)
            finish(victim, attempt)
        elif rc != 0 and attempted:
            # Every case finished but the process then died (teardown crash): keep it.
            last = records[finished_order[-1]]
            last.attempts[-1].child_exit = (signal_name(-rc) if rc < 0 else "exit status %d" % rc)
            last.attempts[-1].stderr_tail = clip(output)
            if on_attempt is not None:
                on_attempt(last, last.attempts[-1])
    finally:
        child.close()
    return attempted


def run_in_child(target: Union[str, Callable], case: Optional[Dict[str, Any]] = None, *,
                 timeout: float = 300.0, retries: int = 0, **kwargs) -> CaseRecord:
    """Run one case in a child process (with retries); return its record."""
    return run_cases(target, [case or {}], timeout=timeout, retries=retries, **kwargs)[0]
