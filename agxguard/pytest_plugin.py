"""pytest plugin (entry point ``pytest11``: ``agxguard``).

- ``lock_mode`` fixture: a test that asks for it runs once per selected mode, with
  the mode set for the test and the previous one restored after. Modes come from
  ``--agxguard-mode=op,global`` (names from agxguard.MODES, or ``all``), else the ini key
  ``agxguard_modes``, else the environment variable ``AGXGUARD_TEST_MODES``, else all.
- ``@pytest.mark.agxguard_isolated(timeout=...)``: the test body runs in a child
  process (agxguard's child runner, agxguard/_runner.py); a crash fails the test with the signal's name (an abort
  with the driver's last words, a hang with the child's Python stacks).
"""
from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Optional

import pytest

ENV_MODES = "AGXGUARD_TEST_MODES"
ENV_CHILD = "AGXGUARD_ISOLATED_CHILD"
DEFAULT_ISOLATED_TIMEOUT = 300.0


def _all_modes() -> List[str]:
    from agxguard import MODES
    return list(MODES)


def parse_modes(value: str, source: str) -> List[str]:
    """Modes from ``value`` (comma-separated, or ``all``); UsageError names the bad one."""
    allowed = _all_modes()
    items = [v.strip() for v in str(value).split(",") if v.strip()]
    if items == ["all"]:
        return allowed
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise pytest.UsageError("agxguard: bad mode %r in %s; allowed: %s, or all"
                                % (",".join(bad) or value, source, ", ".join(allowed)))
    return list(dict.fromkeys(items))


def pytest_addoption(parser):
    group = parser.getgroup("agxguard")
    group.addoption("--agxguard-mode", dest="agxguard_modes", default=None, metavar="MODES",
                    help="modes for the lock_mode fixture: names of agxguard.MODES, comma-"
                         "separated, or all (default: ini agxguard_modes, env %s, else all)" % ENV_MODES)
    parser.addini("agxguard_modes", "modes for the lock_mode fixture (comma-separated or all)",
                  default=None)
    parser.addini("agxguard_isolated_timeout",
                  "seconds before an agxguard_isolated test is declared hung (default %d)"
                  % DEFAULT_ISOLATED_TIMEOUT, default=None)


def selected_modes(config) -> List[str]:
    """The modes chosen by option, ini key or environment, in that order (default all)."""
    opt = config.getoption("agxguard_modes")
    if opt:
        return parse_modes(opt, "--agxguard-mode")
    ini = config.getini("agxguard_modes")
    if ini:
        return parse_modes(ini, "ini agxguard_modes")
    env = os.environ.get(ENV_MODES)
    if env:
        return parse_modes(env, ENV_MODES)
    return _all_modes()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "agxguard_isolated(timeout=None): run the test in a child process; a crash "
                   "(signal, abort, hang) fails the test and names what happened")
    config._agxguard_modes = selected_modes(config)


def pytest_generate_tests(metafunc):
    if "lock_mode" in metafunc.fixturenames:
        modes = metafunc.config._agxguard_modes
        metafunc.parametrize("lock_mode", modes, indirect=True, ids=modes)


@pytest.fixture
def lock_mode(request):
    """The agxguard mode this test runs under (set for the test, restored after)."""
    import agxguard
    mode = getattr(request, "param", None) or agxguard.get_mode()
    previous = agxguard.set_mode(mode)
    try:
        yield mode
    finally:
        agxguard.set_mode(previous)


# -- isolated tests -------------------------------------------------------------------------

def _isolated_timeout(item) -> float:
    marker = item.get_closest_marker("agxguard_isolated")
    t = marker.kwargs.get("timeout") if marker is not None else None
    if t is None:
        ini = item.config.getini("agxguard_isolated_timeout")
        t = float(ini) if ini else DEFAULT_ISOLATED_TIMEOUT
    return float(t)


def _plugin_args(config) -> List[str]:
    """How the child pytest gets this plugin: by entry point if that is how the parent
    got it, else with ``-p``."""
    name = config.pluginmanager.get_name(sys.modules[__name__])
    autoload = not os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD")
    if name == "agxguard" and autoload:
        return []
    return ["-p", __name__]


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    if os.environ.get(ENV_CHILD) or pyfuncitem.get_closest_marker("agxguard_isolated") is None:
        return None
    from agxguard import _runner
    config = pyfuncitem.config
    args = _plugin_args(config) + [
        "-p", "no:cacheprovider", "-q", "-s", "--no-header", "-rN",
        "--agxguard-mode=%s" % ",".join(config._agxguard_modes),
        "--rootdir", str(config.rootpath), pyfuncitem.nodeid]
    env = dict(os.environ, **{ENV_CHILD: "1"})
    rec = _runner.run_in_child(_run_child_pytest, {"args": args, "cwd": str(config.rootpath)},
                               timeout=_isolated_timeout(pyfuncitem), env=env,
                               cwd=str(config.rootpath))
    attempt = rec.attempts[-1]
    if attempt.outcome == "passed":
        outcome = attempt.value or {}
        if outcome.get("outcome") == "skipped":
            pytest.skip("(in child process) %s" % outcome.get("reason", ""))
        if outcome.get("outcome") == "passed":
            return True
        if outcome.get("outcome") == "failed":
            pytest.fail("test failed in its child process:\n%s" % outcome.get("longrepr", ""),
                        pytrace=False)
        pytest.fail("child pytest ran no test for %s (exit status %s):\n%s"
                    % (pyfuncitem.nodeid, outcome.get("exitstatus"), outcome.get("output", "")),
                    pytrace=False)
    detail = attempt.stacks if attempt.outcome == "hang" else attempt.stderr_tail
    pytest.fail("%s in its child process (agxguard_isolated)\n%s"
                % (attempt.describe(), _runner.clip(detail or attempt.traceback or "")), pytrace=False)


class _Outcome:
    """Collects what happened to the one test a child pytest runs."""

    def __init__(self):
        self.result: Dict[str, Any] = {"outcome": None}

    def pytest_runtest_logreport(self, report):
        r = self.result
        if report.failed:
            r.update(outcome="failed", when=report.when,
                     longrepr=str(report.longrepr)[-6000:])
        elif report.skipped and r["outcome"] != "failed":
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            r.update(outcome="skipped", reason=reason)
        elif report.when == "call" and report.passed and r["outcome"] is None:
            r["outcome"] = "passed"


def _run_child_pytest(case: Dict[str, Any]) -> Dict[str, Any]:
    """Runner target: run one test id with pytest in this (child) process."""
    import io
    import contextlib
    os.chdir(case["cwd"])
    collector = _Outcome()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exitstatus = pytest.main(case["args"], plugins=[collector])
    out = dict(collector.result)
    out["exitstatus"] = int(exitstatus)
    out["output"] = buf.getvalue()[-4000:]
    return out
