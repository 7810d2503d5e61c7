"""Lightning checkpoints: the callback that writes them and reading them back safely; the end-of-run summary."""

from __future__ import annotations

import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from pretrain.errors import UserError


class Checkpoints(ModelCheckpoint):
    """Lightning's ModelCheckpoint (`every_n_train_steps`, `save_last`, ...) that also writes `last.ckpt` when
    training ends, so the final weights are always on disk. At `max_steps` it is written right after the last step,
    as a mid-epoch checkpoint: a run continued from it to more steps (`--ckpt_path last --trainer.max_steps N`)
    equals one that ran to N at once."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if 0 <= trainer.max_steps <= trainer.global_step:
            self.on_train_end(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def check_checkpoint_file(path: Path) -> None:
    """A clear error for a checkpoint path that is missing, or a file that is not a whole checkpoint."""
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist (to resume the run in --trainer.default_root_dir, give "
                        "--ckpt_path last)")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not a readable checkpoint (truncated or corrupt?): use an earlier or complete one")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint's contents on the CPU, never unpickling code (`weights_only=True`)."""
    path = Path(path)
    check_checkpoint_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged archive, or objects that weights_only refuses to unpickle
        raise UserError(f"{path} could not be read as a checkpoint ({type(error).__name__}: "
                        f"{str(error).splitlines()[0][:200]})") from error


class RunSummary(Callback):
    """Prints, when `fit` ends, what a user wants to know first: steps, time, the training loss at the start and at
    the end, the last validation loss (and perplexity, for language-model objectives), and where the run is."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.started, self.first_loss, self.start_step = time.perf_counter(), None, trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.first_loss is None and "train/loss" in trainer.callback_metrics:
            self.first_loss = float(trainer.callback_metrics["train/loss"])

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or not hasattr(self, "started"):
            return
        metrics = trainer.callback_metrics
        lines = [f"trained {trainer.global_step - self.start_step} steps in {time.perf_counter() - self.started:.0f} s"
                 f" (global step {trainer.global_step})"]
        if self.first_loss is not None and "train/loss" in metrics:
            lines.append(f"train loss {self.first_loss:.3f} (first step) -> {float(metrics['train/loss']):.3f} (last)")
        validation = [f"{name.removeprefix('val/')} {float(value):.3f}" for name, value in sorted(metrics.items())
                      if name.startswith("val/") and ("loss" in name or "perplexity" in name)]
        if validation:
            lines.append("validation: " + ", ".join(validation))
        if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.dirpath:
            lines.append(f"checkpoints: {trainer.checkpoint_callback.dirpath}")
        if trainer.loggers:  # (not trainer.log_dir: it is a collective call under DDP)
            lines.append(f"logs: {trainer.loggers[0].log_dir}")
        print("\n".join(lines), flush=True)
