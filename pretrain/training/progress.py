"""Progress: `pretrain fit`'s bar, one over the run's steps (not one per epoch); fine-tuning's line per epoch."""

from __future__ import annotations

import sys
import time

import torch
from pytorch_lightning.callbacks import Callback, TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm
from tqdm.auto import tqdm

from pretrain.training.speed import Throughput


class StepProgressBar(TQDMProgressBar):
    """Global step of max_steps, elapsed time and time left, the training and validation losses and tokens/s,
    refreshed every `refresh_rate` steps (the logging steps: the losses are read back from the device then anyway,
    so the bar adds no wait for the GPU). A pretraining run counts steps; its epochs are an accident of the corpus
    size, so they are not what the bar shows. The sanity check and validation have no bar of their own (the step
    bar shows the validation loss once known). Where the output is not a terminal (a log file, a cluster job), the
    same is printed as a plain line at each refresh instead of a bar redrawn with control characters."""

    def init_train_tqdm(self) -> Tqdm:
        self.plain = not sys.stdout.isatty()
        return Tqdm(desc="step", disable=self.is_disabled or self.plain, leave=True, dynamic_ncols=True,
                    file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT, delay=1e-3)  # drawn at the first step

    def init_sanity_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)

    def init_validation_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        bar.reset(total=total)
        bar.initial = bar.n = trainer.global_step  # a resumed run: its rate and time left count its own steps
        self.started, self.first_step = time.monotonic(), trainer.global_step

    def on_train_epoch_start(self, trainer, *_) -> None:
        """One bar for the whole run: nothing to reset at an epoch's start."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step, bar = trainer.global_step, self.train_progress_bar
        if bar is None or self.is_disabled or step == bar.n or not self._should_update(step, bar.total):
            return
        bar.n = step
        if self.plain:
            print(self.line(step, bar.total, self.get_metrics(trainer, pl_module)), flush=True)
            return
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.refresh()

    def line(self, step: int, total: int, metrics: dict) -> str:
        """The bar as one plain line: step of total, time so far and left, the metrics."""
        elapsed = time.monotonic() - self.started
        done = step - self.first_step
        left = f", about {duration(elapsed / done * (total - step))} left" if done and total > step else ""
        values = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        return f"step {step:,}/{total:,} ({duration(elapsed)}{left}): {values}"

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        """The bar stays open across epochs."""

    def get_metrics(self, trainer, pl_module) -> dict[str, int | str | float | dict[str, float]]:
        """The logged progress-bar values (losses), without Lightning's logger version, with tokens/s."""
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        for callback in trainer.callbacks:
            if isinstance(callback, Throughput) and "train/tokens_per_sec" in callback.last:
                metrics["tokens/s"] = f"{callback.last['train/tokens_per_sec']:,.0f}"
        return metrics


def duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class EpochLines(Callback):
    """Fine-tuning's progress: a bar over each epoch's batches where the output is a terminal, and one plain line
    per epoch: the epoch's mean training loss, the dev metrics where dev was scored, the time so far and left."""

    def __init__(self, label: str):
        self.label = label
        self.bar: tqdm | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.started = time.monotonic()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.losses: list[torch.Tensor] = []
        self.scored = len(getattr(pl_module, "history", []))
        self.bar = tqdm(total=trainer.num_training_batches, leave=False, disable=not sys.stderr.isatty(),
                        desc=f"{self.label}, epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.losses.append(outputs["loss"].detach())  # summed at the epoch's end: no wait for the device here
        self.bar.update(1)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.bar.close()
        epoch, epochs = trainer.current_epoch + 1, trainer.max_epochs
        parts = [f"train loss {torch.stack(self.losses).float().mean():.4f}"] if self.losses else []
        history = getattr(pl_module, "history", [])
        if len(history) > self.scored:  # dev was scored this epoch
            parts.append("dev " + ", ".join(f"{name} {value:.2f}" for name, value in history[-1].items()))
        elapsed = time.monotonic() - self.started
        left = f"; about {duration(elapsed / epoch * (epochs - epoch))} left" if epoch < epochs else ""
        print(f"{self.label}, epoch {epoch}/{epochs}: {', '.join(parts)} ({duration(elapsed)}{left})", flush=True)
