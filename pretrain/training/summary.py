"""The end-of-run summary `pretrain fit` prints."""

from __future__ import annotations

import time

from pytorch_lightning.callbacks import Callback

from pretrain.training.checkpoints import LAST, Checkpoints


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
        from pretrain.training.module import PretrainingModule

        if isinstance(pl_module, PretrainingModule) and pl_module.skipped_steps():
            lines.append(f"skipped {pl_module.skipped_steps()} steps with non-finite gradients (weights unchanged)")
        for callback in trainer.callbacks:
            if isinstance(callback, Checkpoints) and callback.dirpath is not None:
                lines.append(f"checkpoints: {callback.dirpath} (newest: {LAST})")
        if trainer.loggers:  # (not trainer.log_dir: it is a collective call under DDP)
            lines.append(f"logs: {trainer.loggers[0].log_dir}")
        print("\n".join(lines), flush=True)
