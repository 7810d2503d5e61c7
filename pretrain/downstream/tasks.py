"""Downstream tasks: the GLUE tasks as distributed (files, columns, labels, official metrics) and any CSV / TSV /
JSONL file with named text and label columns."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pretrain.errors import UserError

if TYPE_CHECKING:  # torch and torchmetrics are imported where used: the command's --help stays light
    import torch

Metric = Literal["accuracy", "f1", "matthews", "pearson", "spearman"]


@dataclass(frozen=True)
class Task:
    """A sentence (or sentence-pair) classification or regression task. Columns are header names, or 0-based
    indices for files without a header (CoLA). `labels` is the label set of a classification task as written in the
    files (None: taken from the training file); its order gives the class ids."""

    name: str
    text: str | int
    label: str | int
    pair: str | int | None = None
    labels: tuple[str, ...] | None = None
    regression: bool = False
    symmetric: bool = False  # the pair's order carries no meaning (similarity, paraphrase): GPT-1 reads both orders
    metrics: tuple[Metric, ...] = ("accuracy",)
    header: bool = True
    train_file: str = "train.tsv"
    dev_file: str = "dev.tsv"
    directory: str = ""  # the task's folder under a GLUE data directory
    label_names: tuple[str, ...] | None = None  # what labels written as numbers mean (GLUE's 0 / 1), in label order


GLUE: dict[str, Task] = {t.name: t for t in [
    Task("cola", text=3, label=1, labels=("0", "1"), metrics=("matthews",), header=False, directory="CoLA",
         label_names=("unacceptable", "acceptable")),
    Task("sst2", text="sentence", label="label", labels=("0", "1"), directory="SST-2",
         label_names=("negative", "positive")),
    Task("mrpc", text="#1 String", pair="#2 String", label="Quality", labels=("0", "1"), symmetric=True,
         metrics=("f1", "accuracy"), directory="MRPC", label_names=("not_equivalent", "equivalent")),
    Task("stsb", text="sentence1", pair="sentence2", label="score", regression=True, symmetric=True,
         metrics=("pearson", "spearman"), directory="STS-B"),
    Task("qqp", text="question1", pair="question2", label="is_duplicate", labels=("0", "1"), symmetric=True,
         metrics=("accuracy", "f1"), directory="QQP", label_names=("not_duplicate", "duplicate")),
    Task("mnli", text="sentence1", pair="sentence2", label="gold_label",
         labels=("contradiction", "entailment", "neutral"), dev_file="dev_matched.tsv", directory="MNLI"),
    Task("qnli", text="question", pair="sentence", label="label", labels=("entailment", "not_entailment"),
         directory="QNLI"),
    Task("rte", text="sentence1", pair="sentence2", label="label", labels=("entailment", "not_entailment"),
         directory="RTE"),
    Task("wnli", text="sentence1", pair="sentence2", label="label", labels=("0", "1"), directory="WNLI",
         label_names=("not_entailment", "entailment")),
]}
ALIASES = {"sst-2": "sst2", "sts-b": "stsb"}


def glue_task(name: str) -> Task:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in GLUE:
        raise UserError(f"unknown task {name!r}; GLUE tasks: {', '.join(GLUE)} (or give --train/--dev files with "
                        "--text-column and --label-column)")
    return GLUE[key]


@dataclass
class Examples:
    texts: list[str]
    pairs: list[str] | None
    labels: list[str] = field(default_factory=list)


def read_rows(path: Path, header: bool = True) -> tuple[list[str] | None, list[list[str]] | list[dict]]:
    """(column names or None, rows) of a TSV (GLUE's: no quoting), CSV, or JSONL file."""
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    if path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as file:
            rows = [json.loads(line) for line in file if line.strip()]
        return (list(rows[0]) if rows else []), rows
    with path.open(encoding="utf-8-sig", newline="") as file:  # utf-8-sig: MRPC's header starts with a BOM
        if path.suffix == ".tsv":
            lines = [line.rstrip("\r\n").split("\t") for line in file if line.strip()]
        else:
            lines = [row for row in csv.reader(file) if row]
    if not header:
        return None, lines
    names, rows = lines[0], lines[1:]
    return names, [dict(zip(names, row, strict=False)) for row in rows]


def read_examples(task: Task, path: Path) -> Examples:
    """The texts (and pairs) and labels (as strings) of one split."""
    names, rows = read_rows(path, task.header)
    columns = [c for c in (task.text, task.pair, task.label) if c is not None]
    if names is not None:
        missing = [c for c in columns if c not in names]
        if missing:
            raise UserError(f"{path} has no column {', '.join(map(repr, missing))}; its columns: "
                            f"{', '.join(map(str, names))}")
    elif any(not isinstance(c, int) or rows and c >= len(rows[0]) for c in columns):
        raise UserError(f"{path} has {len(rows[0]) if rows else 0} columns, fewer than the task needs")
    examples = Examples([], [] if task.pair is not None else None, [])
    first_line = 2 if task.header and path.suffix not in (".jsonl", ".json") else 1  # after the header, if any
    for number, row in enumerate(rows, start=first_line):
        try:
            examples.texts.append(str(row[task.text]))
            if task.pair is not None:
                examples.pairs.append(str(row[task.pair]))
            label = row[task.label]
        except (KeyError, IndexError):
            raise UserError(f"{path}, line {number}: too few columns") from None
        if label is None or not str(label).strip():
            raise UserError(f"{path}, line {number}: the label ({task.label}) is empty; give every row a label, or "
                            "drop the row")
        examples.labels.append(str(label).strip())
    if not examples.texts:
        raise UserError(f"{path} holds no examples")
    return examples


def label_ids(task: Task, labels: list[str], label_set: tuple[str, ...], path: Path) -> torch.Tensor:
    """Class ids (classification) or float targets (regression); an error naming a label outside the set."""
    import torch

    if task.regression:
        try:
            return torch.tensor([float(label) for label in labels])
        except ValueError:
            bad = next(label for label in labels if not _is_float(label))
            raise UserError(f"{path}: label {bad!r} is not a number (the task is a regression)") from None
    index = {label: i for i, label in enumerate(label_set)}
    unknown = sorted({label for label in labels if label not in index})
    if unknown:
        raise UserError(f"{path}: labels {unknown[:5]} are outside the task's label set {list(label_set)}")
    return torch.tensor([index[label] for label in labels])


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def compute_metrics(metrics: tuple[Metric, ...], predictions: torch.Tensor, targets: torch.Tensor,
                    num_labels: int) -> dict[str, float]:
    """The official GLUE metrics (torchmetrics), in percent: accuracy, F1 of the positive class, Matthews
    correlation, Pearson and Spearman correlations."""
    from torchmetrics.functional import matthews_corrcoef, pearson_corrcoef, spearman_corrcoef
    from torchmetrics.functional.classification import binary_f1_score

    out = {}
    for metric in metrics:
        if metric == "accuracy":
            value = (predictions == targets).float().mean()
        elif metric == "f1":
            value = binary_f1_score(predictions, targets)
        elif metric == "matthews":
            value = matthews_corrcoef(predictions, targets, task="binary" if num_labels == 2 else "multiclass",
                                      num_classes=num_labels)
        elif metric == "pearson":
            value = pearson_corrcoef(predictions.float(), targets.float())
        else:
            value = spearman_corrcoef(predictions.float(), targets.float())
        out[metric] = 100 * float(value)
    return out


def score(values: dict[str, float]) -> float:
    """One number per task, as the GLUE leaderboard reports it: the mean of the task's metrics."""
    return sum(values.values()) / len(values)
