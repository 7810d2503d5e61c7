"""Fine-tuning a pretrained encoder on a downstream task: a classification (or regression) head on [CLS], dev
evaluation with the task's official metrics each epoch, the best epoch kept, several seeds summarised."""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch import Tensor, nn

from models import ClassificationHead, ModelWithHeads, Transformer
from pretrain.downstream.inputs import pad_pairs, task_output
from pretrain.downstream.pretrained import Pretrained, load
from pretrain.downstream.tasks import Task, compute_metrics, label_ids, read_examples, score
from pretrain.errors import UserError
from pretrain.training.optim import build_optimizer, schedule_factor


@dataclass
class Settings:
    epochs: int = 3
    learning_rate: float = 1e-4
    batch_size: int = 32
    max_length: int = 128
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    from_scratch: bool = False  # same architecture and tokenizer, random weights: the baseline


class TaskExamples(torch.utils.data.Dataset):
    """Tokenized examples (ids and segment ids, [CLS] A [SEP] (B [SEP])) and their targets."""

    def __init__(self, pretrained: Pretrained, texts: list[str], pairs: list[str] | None, targets: Tensor,
                 max_length: int):
        self.rows = pretrained.tokenize_pairs(texts, pairs, max_length)
        self.targets = targets

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        return self.rows[index], self.targets[index]


def collate(pad_id: int):
    def stack(items) -> dict[str, Tensor]:
        return pad_pairs([row for row, _ in items], pad_id) | {"targets": torch.stack([t for _, t in items])}
    return stack


class FineTuningModule(pl.LightningModule):
    """Backbone + task head; cross-entropy (classification) or MSE (regression); keeps the weights of the best
    dev epoch (by the mean of the task's metrics)."""

    def __init__(self, backbone: Transformer, head: nn.Module, task: Task, num_labels: int,
                 settings: Settings):
        super().__init__()
        self.backbone, self.head, self.task, self.num_labels, self.settings = backbone, head, task, num_labels, settings
        self.best: tuple[float, dict[str, float], int, dict[str, Tensor]] | None = None
        self._outputs: list[tuple[Tensor, Tensor]] = []
        self.history: list[dict[str, float]] = []

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return task_output(self.backbone, self.head, batch, self.task.regression)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        output = self(batch)
        loss = (nn.functional.mse_loss(output.float(), batch["targets"].float()) if self.task.regression
                else nn.functional.cross_entropy(output.float(), batch["targets"]))
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


def finetune_once(model_path: str | Path, task: Task, labels: tuple[str, ...], train_data: TaskExamples,
                  dev_data: TaskExamples, seed: int, settings: Settings, out: Path) -> dict:
    """One seed, from the model's weights as saved (read anew: the seed's random draws are those of a fresh
    start): train, evaluate each epoch, save the best epoch's model to `out` (loadable by `pretrain.load`, with
    `.predict`). Returns the best epoch's metrics."""
    pl.seed_everything(seed, verbose=False)
    pretrained = load(model_path)
    config = pretrained.config
    num_labels = 1 if task.regression else len(labels)
    backbone = pretrained.model.backbone
    if settings.from_scratch:
        backbone = Transformer(config)  # same architecture and tokenizer, random weights
    head = ClassificationHead(backbone, num_labels=num_labels)
    # BERT's and ALBERT's pair classifiers (NSP, SOP) have a trained [CLS] pooler: start from it
    source = next((h for h in pretrained.model.heads.values() if isinstance(h, ClassificationHead)), None)
    if source is not None and not settings.from_scratch:
        head.pooler.load_state_dict(source.pooler.state_dict())  # BERT starts from its NSP pooler
    loaders = [torch.utils.data.DataLoader(data, batch_size=settings.batch_size, shuffle=shuffle,
                                           collate_fn=collate(pretrained.pad_id),
                                           generator=torch.Generator().manual_seed(seed))
               for data, shuffle in ((train_data, True), (dev_data, False))]
    module = FineTuningModule(backbone, head, task, num_labels, settings)
    module.train()  # `load` gives the model in eval mode; Lightning keeps each module's mode: dropout must be on
    trainer = pl.Trainer(max_epochs=settings.epochs, logger=CSVLogger(out, name="", version=""),
                         enable_checkpointing=False, num_sanity_val_steps=0, enable_model_summary=False,
                         enable_progress_bar=False, log_every_n_steps=50)
    trainer.fit(module, *loaders)
    best_score, metrics, epoch, state = module.best
    module.load_state_dict(state)
    model = ModelWithHeads(module.backbone, {"task": module.head})
    info = {"name": task.name, "labels": list(labels), "regression": task.regression, "pair": task.pair is not None,
            "max_length": settings.max_length}
    Pretrained(model, pretrained.tokenizer, task=info).save(out / "model")
    return {"seed": seed, "best_epoch": epoch, "score": best_score, **metrics, "history": module.history}


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
    if pretrained.config.causal:
        raise UserError("fine-tuning needs an encoder (a bidirectional model such as BERT, ALBERT or ELECTRA); "
                        f"{model_path} is a causal LM")
    train, dev = read_examples(task, train_path), read_examples(task, dev_path)
    labels = label_set(task, train.labels)
    train_data, dev_data = (
        TaskExamples(pretrained, split.texts, split.pairs, label_ids(task, split.labels, labels, path),
                     settings.max_length) for split, path in ((train, train_path), (dev, dev_path)))
    runs = []
    for seed in seeds:
        runs.append(finetune_once(model_path, task, labels, train_data, dev_data, seed, settings,
                                  out / f"seed-{seed}"))
        best = runs[-1]
        print(f"{task.name} seed {seed}: best epoch {best['best_epoch']}: " +
              ", ".join(f"{m} {best[m]:.2f}" for m in task.metrics), flush=True)
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
