"""The table of pretraining_pays_off.sh and causal_downstream.sh: SST-2 dev accuracy after fine-tuning from the
pretrained weights and from scratch (median, min, max over seeds), and with --zero-shot the zero- and few-shot rows
of causal_downstream.sh. From the repository root: python benchmarks/payoff_table.py RUN_DIR [--zero-shot]"""

from __future__ import annotations

import argparse
import glob
import json
import statistics

WIDTH = 70


def row(label: str, values: list[float]) -> str:
    """One line: the label, then median, min and max of the values, then each value."""
    return (f"{label:<{WIDTH}} {statistics.median(values):7.2f} {min(values):7.2f} {max(values):7.2f}  "
            + ", ".join(f"{v:.2f}" for v in values))


def table(run: str, prefix: str, zero_shot: bool) -> list[str]:
    lines = [f"{'SST-2 dev accuracy (872 sentences)':<{WIDTH}} {'median':>7} {'min':>7} {'max':>7}  seeds"]
    for name in ("pretrained", "scratch"):
        runs = json.load(open(f"{run}/sst2-{name}/results.json"))["runs"]
        lines.append(row(f"{prefix}from {name}", [r["accuracy"] for r in runs]))
    if not zero_shot:
        return lines
    majority = None
    for index in (0, 1):
        for calibrated in ("", "-calibrated"):
            for shots in (0, 4):
                runs = [json.load(open(path)) for path in
                        sorted(glob.glob(f"{run}/sst2-prompt{index}{calibrated}-{shots}-shot-seed*.json"))]
                label = (f"{shots}-shot{calibrated.replace('-', ' ')} {runs[0]['template']!r} ->"
                         + "/".join(runs[0]["label_words"]))
                lines.append(row(label, [r["metrics"]["accuracy"] for r in runs]))
                majority = runs[0]["majority_accuracy"]
    lines.append(f"{'majority class':<{WIDTH}} {majority:7.2f}")
    return lines


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run")
    parser.add_argument("--prefix", default="", help="before 'from pretrained' / 'from scratch'")
    parser.add_argument("--zero-shot", action="store_true", help="also the zero- and few-shot rows")
    args = parser.parse_args()
    print("\n".join(table(args.run, args.prefix, args.zero_shot)))
