"""The progress bar of `pretrain fit`: one bar over the run's steps, not one per epoch."""

from __future__ import annotations

from pytorch_lightning.callbacks import TQDMProgressBar

from pretrain.training.speed import Throughput


class StepProgressBar(TQDMProgressBar):
    """Global step of max_steps, elapsed time and time left, the training and validation losses and tokens/s,
    refreshed every `refresh_rate` steps (the logging steps: the losses are read back from the device then anyway,
    so the bar adds no wait for the GPU). A pretraining run counts steps; its epochs are an accident of the corpus
    size, so they are not what the bar shows."""

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        bar.reset(total=total)
        bar.initial = bar.n = trainer.global_step  # a resumed run: its rate and time left count its own steps
        bar.set_description("step")
        bar.refresh()

    def on_train_epoch_start(self, trainer, *_) -> None:
        """One bar for the whole run: nothing to reset at an epoch's start."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step, bar = trainer.global_step, self.train_progress_bar
        if bar is not None and not bar.disable and step != bar.n and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

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
