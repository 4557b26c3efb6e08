"""The demo over several seeds: each ``ds-unlearn demo --seed N`` run (its own planted and
retrained models), then the "Against the retrained model" table as mean (min to max) per model.

    python bench/demo_seeds.py --output_dir /tmp/seeds                # seeds 0 1 2, method match
    python bench/demo_seeds.py --output_dir /tmp/seeds --methods ga sga tau undial match

A seed whose DIR/seedN/report.json exists is read, not rerun (--rerun to run it again). About 11
minutes per seed with one method on 2 idle CPU cores (planting 165 s, retrained 70 s, audit 70 s,
match about 350 s). Prints one line per seed (its own clock), then the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ds_unlearn.cli import main as cli
from ds_unlearn.demo.seeds import spread_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True, help="one demo folder per seed: DIR/seedN")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["match"])
    parser.add_argument("--rerun", action="store_true", help="run a seed again even if its report exists")
    args = parser.parse_args()
    reports = []
    for seed in args.seeds:
        out = Path(args.output_dir) / f"seed{seed}"
        if args.rerun or not (out / "report.json").is_file():
            argv = ["demo", "--output_dir", str(out), "--seed", str(seed), "--methods", *args.methods, "--overwrite"]
            if cli(argv) != 0:
                raise SystemExit(f"demo seed {seed} failed")
        report = json.loads((out / "report.json").read_text())
        reports.append(report)
        print(f"seed {seed}: {out}, {report['timing']['total']:.0f} s by its own clock")
    print("\n".join(spread_table(reports)))


if __name__ == "__main__":
    main()
