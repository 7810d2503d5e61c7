"""`pretrain plot RUN_DIR -o curves.png`: a run's loss curves, one panel per objective, from its CSV logs."""

from __future__ import annotations

import csv
from pathlib import Path

from pretrain.errors import UserError


def read_metrics(run_dir: Path) -> dict[str, dict[int, float]]:
    """column -> {step: value}, over every version of the run's logs (a fit and its resumes), later ones winning."""
    files = sorted((run_dir / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not files:
        files = sorted(run_dir.glob("**/metrics.csv"))
    if not files:
        raise UserError(f"no metrics.csv under {run_dir}: give the run directory of pretrain fit "
                        "(its trainer.default_root_dir)")
    columns: dict[str, dict[int, float]] = {}
    for path in files:
        try:
            with path.open(newline="", encoding="utf-8") as file:
                for row in csv.DictReader(file):
                    for name, value in row.items():
                        if name not in ("step", "epoch") and value not in ("", None):
                            columns.setdefault(name, {})[int(row["step"])] = float(value)
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
            raise UserError(f"{path} is not a metrics.csv of pretrain fit ({type(error).__name__}: {error}); give the "
                            "run directory of pretrain fit") from error
    return columns


def objective_names(columns: dict[str, dict[int, float]]) -> list[str]:
    """Objectives with a loss in the logs, e.g. ["mlm", "nsp"]; sub-losses such as rtd_generator_loss are drawn in
    their objective's panel."""
    names = [name[len("train/"):-len("_loss")] for name in columns
             if name.startswith("train/") and name.endswith("_loss")]
    return sorted(n for n in names if not any(n.startswith(f"{o}_") for o in names if o != n))


def plot(run_dir: str | Path, out: str | Path) -> list[str]:
    """Draw the curves into the PNG `out`; returns the objectives drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir, out = Path(run_dir), Path(out)
    columns = read_metrics(run_dir)
    objectives = objective_names(columns)
    if not objectives:
        raise UserError(f"the logs under {run_dir} hold no per-objective training loss (train/<objective>_loss)")
    figure, axes = plt.subplots(1, len(objectives), figsize=(5 * len(objectives), 3.6), squeeze=False)
    for axis, name in zip(axes[0], objectives, strict=True):
        for column in sorted(columns):
            stage, _, metric = column.partition("/")
            if stage in ("train", "val") and metric.startswith(f"{name}_") and metric.endswith("loss"):
                steps = sorted(columns[column])
                axis.plot(steps, [columns[column][s] for s in steps], "-" if stage == "train" else "o--",
                          label=column, markersize=3)
        axis.set_title(name)
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(str(run_dir))
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return objectives
