"""The options the two crash-table scripts share, and their common refusal when the
build has no driver model."""
import argparse
import sys

from agxguard.lab import model


def parse(doc: str, default_runs: int) -> argparse.Namespace:
    """Parse --runs/--threads/--iterations/--window-yields/--json; exit 2 without a
    driver model (a build with no Objective-C runtime)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=default_runs)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--window-yields", type=int, default=1)
    ap.add_argument("--json", help="also write the table as JSON here")
    a = ap.parse_args()
    if not model.available():
        print("the driver model is unavailable in this build (no Objective-C runtime)", file=sys.stderr)
        raise SystemExit(2)
    return a
