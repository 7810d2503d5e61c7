"""What `pretrain fit` prints about the model when it starts, and the summary when it ends."""

from __future__ import annotations

import shlex
import time
from pathlib import Path

from pytorch_lightning.callbacks import Callback

from pretrain.training.checkpoints import LAST, Checkpoints


class ModelOverview(Callback):
    """The model in one line at the start: distinct parameters (shared and tied ones once), per top-level part, and
    the training FLOPs per token (`speed.model_flops_per_token`). In place of Lightning's table, whose FLOPs column
    needs an example input and printed zeros."""

    def on_fit_start(self, trainer, pl_module) -> None:
        from pretrain.training.module import PretrainingModule
        from pretrain.training.speed import model_flops_per_token

        if not trainer.is_global_zero:
            return
        total = sum(p.numel() for p in pl_module.parameters())
        parts = ", ".join(f"{name} {sum(p.numel() for p in child.parameters()):,}"
                          for name, child in pl_module.named_children() if any(True for _ in child.parameters()))
        line = f"model: {total:,} parameters ({parts}; tied weights counted in each part, once in the total)"
        from pretrain.data.datamodule import PretrainingDataModule

        data = trainer.datamodule
        length = data.hparams.max_length if isinstance(data, PretrainingDataModule) else None
        if isinstance(pl_module, PretrainingModule) and length:
            line += f", {model_flops_per_token(pl_module, length) / 1e6:,.1f} MFLOP per training token at length " \
                    f"{length}"
        print(line, flush=True)


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
        from pretrain.training.module import PretrainingModule

        lines = [f"trained {trainer.global_step - self.start_step} steps in {time.perf_counter() - self.started:.0f} s"
                 f" (global step {trainer.global_step})"]
        if self.first_loss is not None and "train/loss" in metrics:
            lines.append(f"train loss {self.first_loss:.3f} (first step) -> {float(metrics['train/loss']):.3f} (last)")
        validation = [f"{name.removeprefix('val/')} {float(value):.3f}" for name, value in sorted(metrics.items())
                      if name.startswith("val/") and ("loss" in name or "perplexity" in name)]
        if validation:
            lines.append("validation: " + ", ".join(validation))
        if isinstance(pl_module, PretrainingModule) and pl_module.skipped_steps():
            lines.append(f"skipped {pl_module.skipped_steps()} steps with non-finite gradients (weights unchanged)")
        run = Path(trainer.default_root_dir)
        lines.append(f"run: {shown(run)}")
        checkpoint = None
        for callback in trainer.callbacks:
            if isinstance(callback, Checkpoints) and callback.dirpath is not None:
                checkpoint = Path(callback.dirpath) / LAST
                lines.append(f"checkpoints: {shown(Path(callback.dirpath))} (newest: {LAST})")
        if trainer.loggers:  # (not trainer.log_dir: it is a collective call under DDP)
            lines.append(f"logs: {shown(Path(trainer.loggers[0].log_dir))}")
        if checkpoint is not None and checkpoint.exists():  # (a file, or a sharded directory)
            causal = isinstance(pl_module, PretrainingModule) and pl_module.backbone.config.causal
            lines += ["next (FILE, GLUE_DIR: yours):", *next_commands(run, checkpoint, causal)]
        print("\n".join(lines), flush=True)


def shown(path: Path) -> str:
    """A path as the user typed paths: relative to the working directory when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def next_commands(run: Path, checkpoint: Path, causal: bool) -> list[str]:
    """What to run next on this run's checkpoint, paths filled in."""
    ckpt, run = shlex.quote(shown(checkpoint)), shown(run)
    commands = [f"pretrain plot {shlex.quote(run)} -o {shlex.quote(run + '/curves.png')}",
                f"pretrain export {ckpt} {shlex.quote(run + '/model')}"]
    if causal:
        commands += [f"pretrain generate {ckpt} --prompt 'Once upon a time' --strategy sample --top-p 0.95",
                     f"pretrain evaluate-lm {ckpt} --data FILE"]
    commands.append(f"pretrain finetune --model {ckpt} --task sst2 --data-dir GLUE_DIR --out "
                    f"{shlex.quote(run + '/sst2')}")
    if causal:
        commands.append(f"pretrain zero-shot --model {ckpt} --task sst2 --data-dir GLUE_DIR --template "
                        "'Review: {text}\\nSentiment:' --labels ' negative, positive'")
    return ["  " + command for command in commands]
