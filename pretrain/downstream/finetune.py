"""Fine-tuning a pretrained model on a downstream task, dev evaluation with the task's official metrics each epoch,
the best epoch kept, several seeds summarised. An encoder gets a classification (or regression) head on [CLS]; a
causal model is fine-tuned as GPT-1 is: its input transformed into `start A delim B extract`, a linear head on the
last real token, and the language-model loss on the same inputs added with weight `lm_weight`."""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch import Tensor, nn

from models import (
    ClassificationHead,
    LastTokenClassifier,
    LMHead,
    MeanPoolingClassifier,
    ModelWithHeads,
    SequenceHead,
    Transformer,
    build_head,
    head_spec,
)
from pretrain.downstream.inputs import Row, task_batch, task_output
from pretrain.downstream.pretrained import Pretrained, load
from pretrain.downstream.tasks import Task, compute_metrics, label_ids, read_examples, score
from pretrain.errors import UserError
from pretrain.training.optim import build_optimizer, schedule_factor
from pretrain.training.progress import EpochLines


@dataclass
class Settings:
    epochs: int = 3
    learning_rate: float = 1e-4
    batch_size: int = 32
    max_length: int = 128
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    from_scratch: bool = False  # same architecture and tokenizer, random weights: the baseline
    lm_weight: float = 0.5  # causal models: weight of the auxiliary LM loss (GPT-1's lambda); 0 turns it off
    last_epoch_only: bool = False  # evaluate on dev after the last epoch only (the model kept is the last epoch's)
    score_train: bool = False  # also score the training set with the kept model (does it fit its own data?)
    pooling: Literal["cls", "mean"] = "cls"  # an encoder's read-out: [CLS] through BERT's pooler, or the mean state


class TaskExamples(torch.utils.data.Dataset):
    """Tokenized examples (`Pretrained.task_inputs`: one or two inputs of ids and segment ids each) and their
    targets."""

    def __init__(self, rows: list[list[Row]], targets: Tensor):
        self.rows, self.targets = rows, targets

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        return self.rows[index], self.targets[index]


def collate(pad_id: int):
    def stack(items) -> dict[str, Tensor]:
        return task_batch([row for row, _ in items], pad_id) | {"targets": torch.stack([t for _, t in items])}
    return stack


class FineTuningModule(pl.LightningModule):
    """Backbone + task head; cross-entropy (classification) or MSE (regression), plus `lm_weight` times the
    next-token loss when an LM head is given (causal models); keeps the weights of the best dev epoch (by the mean of
    the task's metrics)."""

    def __init__(self, backbone: Transformer, head: SequenceHead, task: Task, num_labels: int,
                 settings: Settings, lm_head: LMHead | None = None):
        super().__init__()
        self.backbone, self.head, self.task, self.num_labels, self.settings = backbone, head, task, num_labels, settings
        self.lm_head = lm_head if settings.lm_weight else None
        self.best: tuple[float, dict[str, float], int, dict[str, Tensor]] | None = None
        self._outputs: list[tuple[Tensor, Tensor]] = []
        self.history: list[dict[str, float]] = []

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return task_output(self.backbone, self.head, batch, self.task.regression)[0]

    def task_loss(self, output: Tensor, targets: Tensor) -> Tensor:
        if self.task.regression:
            return nn.functional.mse_loss(output.float(), targets.float())
        return nn.functional.cross_entropy(output.float(), targets)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        output, lm_loss = task_output(self.backbone, self.head, batch, self.task.regression, self.lm_head)
        loss = self.task_loss(output, batch["targets"])
        if lm_loss is not None:
            self.log("train/task_loss", loss)
            self.log("train/lm_loss", lm_loss)
            loss = loss + self.settings.lm_weight * lm_loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        output = self(batch)
        predictions = output.float() if self.task.regression else output.argmax(-1)
        self._outputs.append((predictions.cpu(), batch["targets"].cpu()))

    def on_validation_epoch_end(self) -> None:
        predictions, targets = (torch.cat(parts) for parts in zip(*self._outputs, strict=True))
        self._outputs.clear()
        metrics = compute_metrics(self.task.metrics, predictions, targets, self.num_labels)
        for name, value in metrics.items():
            self.log(f"dev/{name}", value)
        self.history.append(metrics)
        value = score(metrics)
        if self.best is None or value > self.best[0]:
            state = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
            self.best = (value, metrics, self.current_epoch + 1, state)

    def configure_optimizers(self):
        s = self.settings
        optimizer = build_optimizer("adamw", self, s.learning_rate, s.weight_decay, (0.9, 0.999), 1e-6)
        total = int(self.trainer.estimated_stepping_batches)
        warmup = int(s.warmup_ratio * total)
        factor = schedule_factor("linear", warmup, max(total, warmup + 1))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def label_set(task: Task, train_labels: list[str]) -> tuple[str, ...]:
    if task.regression:
        return ()
    return task.labels or tuple(sorted(set(train_labels)))


def task_model(pretrained: Pretrained, num_labels: int, from_scratch: bool, pooling: str = "cls"
               ) -> tuple[Transformer, SequenceHead, LMHead | None]:
    """The backbone to fine-tune (the pretrained one, or random weights of the same architecture: the baseline), a
    new task head, and for a causal model its LM head on that backbone (for the auxiliary loss; None if it has none).
    An encoder's head reads [CLS] (starting from BERT's or ALBERT's trained NSP/SOP pooler where there is one) or,
    with `pooling="mean"`, the mean of its real tokens' states; a causal model's the last real token (GPT-1)."""
    backbone = Transformer(pretrained.config) if from_scratch else pretrained.model.backbone
    heads = pretrained.model.heads.values()
    if pretrained.config.causal:
        source = next((h for h in heads if isinstance(h, LMHead)), None)
        lm_head = source if source is None or not from_scratch else build_head(head_spec(source), backbone)
        return backbone, LastTokenClassifier(backbone, num_labels=num_labels), lm_head
    if pooling == "mean":
        return backbone, MeanPoolingClassifier(backbone, num_labels=num_labels), None
    head = ClassificationHead(backbone, num_labels=num_labels)
    source = next((h for h in heads if isinstance(h, ClassificationHead)), None)
    if source is not None and not from_scratch:
        head.pooler.load_state_dict(source.pooler.state_dict())
    return backbone, head, None


def finetune_once(model_path: str | Path, task: Task, labels: tuple[str, ...], train_data: TaskExamples,
                  dev_data: TaskExamples, seed: int, settings: Settings, out: Path) -> dict:
    """One seed, from the model's weights as saved (read anew: the seed's random draws are those of a fresh
    start): train, evaluate each epoch, save the best epoch's model to `out` (loadable by `pretrain.load`, with
    `.predict`). Returns the best epoch's metrics."""
    pl.seed_everything(seed, verbose=False)
    pretrained = load(model_path)
    info = {"name": task.name, "labels": list(labels), "regression": task.regression, "pair": task.pair is not None,
            "max_length": settings.max_length}
    if task.label_names and task.labels and tuple(labels) == task.labels:
        info["label_names"] = list(task.label_names)
    if pretrained.config.causal:
        info |= {"gpt_tokens": pretrained.gpt_tokens()[0], "symmetric": symmetric(task)}
    num_labels = 1 if task.regression else len(labels)
    backbone, head, lm_head = task_model(pretrained, num_labels, settings.from_scratch, settings.pooling)
    loaders = [torch.utils.data.DataLoader(data, batch_size=settings.batch_size, shuffle=shuffle,
                                           collate_fn=collate(pretrained.pad_id),
                                           generator=torch.Generator().manual_seed(seed))
               for data, shuffle in ((train_data, True), (dev_data, False))]
    module = FineTuningModule(backbone, head, task, num_labels, settings, lm_head)
    module.train()  # `load` gives the model in eval mode; Lightning keeps each module's mode: dropout must be on
    trainer = pl.Trainer(max_epochs=settings.epochs, logger=CSVLogger(out, name="", version=""),
                         enable_checkpointing=False, num_sanity_val_steps=0, enable_model_summary=False,
                         enable_progress_bar=False, check_val_every_n_epoch=settings.epochs if
                         settings.last_epoch_only else 1,
                         log_every_n_steps=min(50, len(loaders[0])),  # at least once an epoch
                         callbacks=[EpochLines(f"{task.name} seed {seed}")])
    trainer.fit(module, *loaders)
    best_score, metrics, epoch, state = module.best
    module.load_state_dict(state)
    scored_train = {}
    if settings.score_train:
        in_order = torch.utils.data.DataLoader(train_data, batch_size=settings.batch_size,
                                               collate_fn=collate(pretrained.pad_id))
        scored_train = {"train": evaluate(module, in_order)}
    heads = {"task": module.head}
    if lm_head is not None:  # a fine-tuned causal model still generates
        heads |= {name: lm_head for name, h in pretrained.model.heads.items() if isinstance(h, LMHead)}
    Pretrained(ModelWithHeads(module.backbone, heads), pretrained.tokenizer, task=info).save(out / "model")
    return {"seed": seed, "best_epoch": epoch, "score": best_score, **metrics, "history": module.history,
            **scored_train}


@torch.no_grad()
def evaluate(module: FineTuningModule, loader: torch.utils.data.DataLoader) -> dict[str, float]:
    """The task's metrics of `module` (in eval mode: no dropout) on every example of `loader`."""
    module.eval()
    predictions, targets = [], []
    for batch in loader:
        output = module(batch)
        predictions.append(output.float() if module.task.regression else output.argmax(-1))
        targets.append(batch["targets"])
    return compute_metrics(module.task.metrics, torch.cat(predictions), torch.cat(targets), module.num_labels)


def lm_loss_note(pretrained: Pretrained, lm_weight: float) -> str:
    if not lm_weight:
        return "; no auxiliary LM loss (--lm-weight 0)"
    if not any(isinstance(head, LMHead) for head in pretrained.model.heads.values()):
        return "; no auxiliary LM loss: the model has no LM head"
    return f"; auxiliary LM loss weight {lm_weight}"


def symmetric(task: Task) -> bool:
    """Whether a causal model reads the task's pairs in both orders (GPT-1 on similarity tasks)."""
    return task.symmetric and task.pair is not None


def summarise(runs: list[dict], metrics: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Median, minimum and maximum over seeds of each metric and of the task score."""
    return {name: {"median": statistics.median(r[name] for r in runs), "min": min(r[name] for r in runs),
                   "max": max(r[name] for r in runs)} for name in (*metrics, "score")}


def finetune(model_path: str | Path, task: Task, train_path: Path, dev_path: Path, out: Path, seeds: list[int],
             settings: Settings) -> dict:
    """Every seed in turn; writes out/seed-N/ (model and logs) and out/results.json; returns the results."""
    for name in ("pytorch_lightning", "lightning_fabric"):  # one line per seed is enough
        logging.getLogger(name).setLevel(logging.WARNING)
    pretrained = load(model_path)  # the data are read and tokenized once for all seeds
    if pretrained.config.causal and settings.pooling != "cls":
        raise UserError(f"--pooling {settings.pooling} is for encoders: a causal model is read at its last real token, "
                        "the one position that has seen the whole input (GPT-1); leave --pooling out")
    positions = pretrained.config.max_position_embeddings
    if settings.max_length > positions:  # said, and recorded as it is used
        print(f"note: --max-length {settings.max_length} is cut to the model's {positions} positions", flush=True)
        settings = replace(settings, max_length=positions)
    gpt_tokens = None
    if pretrained.config.causal:
        gpt_tokens, added = pretrained.gpt_tokens()
        names = {role: pretrained.tokenizer.id_to_token(i) for role, i in gpt_tokens.items()}
        print(f"GPT-1 inputs: start {names['start']!r}, delimiter {names['delim']!r}, extract {names['extract']!r}"
              + (f" (added to the tokenizer, with new embedding rows: {', '.join(added)})" if added else "")
              + (", both orders of each pair" if symmetric(task) else "")
              + lm_loss_note(pretrained, settings.lm_weight), flush=True)
    train, dev = read_examples(task, train_path), read_examples(task, dev_path)
    labels = label_set(task, train.labels)
    train_data, dev_data = (
        TaskExamples(pretrained.task_inputs(split.texts, split.pairs, settings.max_length, gpt_tokens,
                                            symmetric(task)), label_ids(task, split.labels, labels, path))
        for split, path in ((train, train_path), (dev, dev_path)))
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in seeds:
        runs.append(finetune_once(model_path, task, labels, train_data, dev_data, seed, settings,
                                  out / f"seed-{seed}"))
        best = runs[-1]
        print(f"{task.name} seed {seed}: {'epoch' if settings.last_epoch_only else 'best epoch'} "
              f"{best['best_epoch']}: " + ", ".join(f"{m} {best[m]:.2f}" for m in task.metrics)
              + ("; training set: " + ", ".join(f"{m} {best['train'][m]:.2f}" for m in task.metrics)
                 if "train" in best else ""), flush=True)
    results = {"task": task.name, "model": str(model_path), "settings": asdict(settings), "runs": runs,
               "summary": summarise(runs, task.metrics)}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def table(rows: list[tuple[str, dict]], metrics_of: dict[str, tuple[str, ...]]) -> str:
    """A readable table: one row per task, median [min, max] over seeds of each metric, and the task score."""
    lines = [f"{'task':<8} {'metric':<10} {'median':>8} {'min':>8} {'max':>8}"]
    for name, summary in rows:
        for metric in (*metrics_of[name], "score"):
            value = summary[metric]
            lines.append(f"{name:<8} {metric:<10} {value['median']:8.2f} {value['min']:8.2f} {value['max']:8.2f}")
    return "\n".join(lines)
