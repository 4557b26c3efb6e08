"""The demo's indistinguishability goal, item by item, for one method of one or more demo folders.

    python bench/demo_goal.py /tmp/demo                       # the match method
    python bench/demo_goal.py /tmp/seeds/seed0 /tmp/seeds/seed1 /tmp/seeds/seed2 --method sga

Reads each DIR/report.json (``ds-unlearn demo`` or ``bench/demo_seeds.py``); runs nothing. Prints
per folder a table of the goal's items (``ds_unlearn.demo.goal``): value, goal, met (n/a where
the report cannot measure it, e.g. TPR at 1% FPR with fewer than 100 never-planted records).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ds_unlearn.demo.goal import goal_lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="demo output folders (each with report.json)")
    parser.add_argument("--method", default="match", help="the method's key in report.json's methods")
    args = parser.parse_args()
    for d in args.dirs:
        if not (d / "report.json").is_file():
            raise SystemExit(f"{d}: no report.json (not a ds-unlearn demo output folder)")
        report = json.loads((d / "report.json").read_text())
        if args.method not in report["methods"]:
            raise SystemExit(f"{d}: no method {args.method!r} in its report (ran: {', '.join(report['methods'])})")
        print("\n".join(goal_lines(report, args.method)) + "\n")


if __name__ == "__main__":
    main()
