"""``python -m agxguard.lab story|comprehensive [options]``: run a tradeoff suite.

Prints progress to stderr while it runs and the tradeoff table to stdout at the end;
``--json PATH`` writes the full report (atomically, after every run) and, where
matplotlib is installed, the tradeoff plot as a PNG beside it. Bad option values exit
with status 2 and a message naming the value and the allowed ones, before torch (or
anything that probes a device) is imported: :func:`check_options` checks them all first.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .. import MODES
from .suites import comprehensive as _comprehensive, story as _story
from .suites import common as _common
from .suites.backends import DEVICES

SUITES = ("story", "comprehensive")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m agxguard.lab",
        description="Run an agxguard tradeoff suite under each locking mode, every run "
                    "crash-isolated in a child process.")
    p.add_argument("suite", metavar="SUITE",
                   help="story (chapters: %s) or comprehensive (chapters: %s)"
                        % (", ".join(_story.CHAPTERS), ", ".join(_comprehensive.CHAPTERS)))
    p.add_argument("--chapter", default=None,
                   help="chapters to run, comma-separated (default: all)")
    p.add_argument("--threads", default="1,2,4,8", help="thread counts, comma-separated (default 1,2,4,8)")
    p.add_argument("--iterations", default=None, help="requests per thread (default: per suite and device)")
    p.add_argument("--duration", default=None,
                   help="seconds per throughput run instead of a fixed number of requests")
    p.add_argument("--min-sample-s", default="0.5", metavar="S",
                   help="floor of every throughput sample in seconds (default 0.5); a sample "
                        "under it is marked short and never reported as a rate")
    p.add_argument("--repeats", default="3",
                   help="samples per throughput run; the report keeps each and the spread (default 3)")
    p.add_argument("--shared-model", action="store_true",
                   help="one model for all threads (default: one per thread, as the seeds)")
    p.add_argument("--torch-threads", default=None,
                   help="torch intra-op threads on cpu (default: torch's own, as the seeds)")
    p.add_argument("--mode", default="all",
                   help="%s, several comma-separated, or all (default all)" % ", ".join(MODES))
    p.add_argument("--device", default=None,
                   help="mps, cuda, cpu or model (the driver model); default: the best present")
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH",
                   help="write the JSON report here (and a PNG plot beside it with matplotlib)")
    p.add_argument("--retries", default="2",
                   help="fresh-process retries of a run that did not pass (default 2); "
                        "every attempt is kept and reported")
    return p


def check_options(args: argparse.Namespace) -> argparse.Namespace:
    """Check every option's value, without importing torch or probing a device; return
    them parsed (lists and numbers). Raises OptionError naming the bad value and the
    allowed ones. Whether the named device is present here is left to the suite."""
    if args.suite not in SUITES:
        raise _common.OptionError("bad suite %r; allowed: %s" % (args.suite, ", ".join(SUITES)))
    chapters = (_story if args.suite == "story" else _comprehensive).CHAPTERS
    args.mode = _common.parse_modes(args.mode)
    args.threads = _common.parse_threads(args.threads)
    args.chapter = _common.parse_choice("chapter", args.chapter, chapters)
    args.iterations = _common.parse_positive("iterations", args.iterations)
    args.duration = _common.parse_positive("duration", args.duration, integer=False)
    args.retries = _common.parse_positive("retries", args.retries, allow_zero=True)
    if args.device is not None and args.device not in DEVICES:
        raise _common.OptionError("bad device %r; allowed: %s" % (args.device, ", ".join(DEVICES)))
    if args.json_path is not None:
        path = os.path.abspath(args.json_path)
        parent = os.path.dirname(path)
        if args.json_path == "" or os.path.isdir(path):
            raise _common.OptionError("bad --json %r; allowed: a file path (it is a folder)"
                                      % args.json_path)
        while parent and not os.path.exists(parent):  # the folders made on the way
            parent = os.path.dirname(parent) if os.path.dirname(parent) != parent else ""
        if parent and not os.path.isdir(parent):
            raise _common.OptionError("bad --json %r; allowed: a file path in a folder (%s is a file)"
                                      % (args.json_path, parent))
    return args


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_options(args)
    except _common.OptionError as exc:
        parser.error(str(exc))
    from . import OptionError, comprehensive, story
    run = story if args.suite == "story" else comprehensive
    try:
        report = run(device=args.device, mode=args.mode, chapter=args.chapter,
                     threads=args.threads, iterations=args.iterations, duration=args.duration,
                     retries=args.retries, json_path=args.json_path, progress=sys.stderr,
                     min_sample_s=args.min_sample_s, repeats=args.repeats,
                     shared_model=args.shared_model, torch_threads=args.torch_threads)
    except OptionError as exc:
        parser.error(str(exc))
    except RuntimeError as exc:  # e.g. the device does not work in a child process
        sys.stderr.write("python -m agxguard.lab: %s\n" % exc)
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; the report file (if any) holds every run finished so far\n")
        return 130
    print(report.table())
    if args.json_path:
        sys.stderr.write("report: %s%s\n" % (args.json_path,
                                             "; plot: %s" % report.plot_path if report.plot_path else
                                             " (no plot: matplotlib is not installed)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
