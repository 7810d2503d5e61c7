"""`pretrain fit` and `pretrain validate`: LightningCLI over PretrainingModule and PretrainingDataModule, with this
project's run directory, checkpoints, resume checks and logging."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from pretrain.errors import UserError, unknown_options

LIGHTNING_COMMANDS = ("fit", "validate")


class _Parsed(Exception):
    def __init__(self, config):
        self.config = config


def lightning_cli(argv: list[str], run: bool = True, parse_only: bool = False):
    """`pretrain fit -c recipe.yaml [--section.key value ...]`: LightningCLI over PretrainingModule and
    PretrainingDataModule. A run directory (`trainer.default_root_dir`) holds `checkpoints/` (last.ckpt, for
    `--ckpt_path last`) and `logs/version_N/` (CSV and TensorBoard logs and the resolved config.yaml, one version
    per fit or resume). With run=False (argv without the subcommand) the recipe is only parsed and its classes built;
    with parse_only, the resolved config is returned before anything is built or read (files, checkpoints and run
    directories need not exist)."""
    from jsonargparse import ArgumentError
    from pytorch_lightning.callbacks import ProgressBar
    from pytorch_lightning.cli import LightningCLI, SaveConfigCallback
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    from pretrain.data.datamodule import PretrainingDataModule
    from pretrain.training.checkpoints import Checkpoints, SafeCheckpointIO
    from pretrain.training.distributed import fsdp_strategy
    from pretrain.training.module import PretrainingModule
    from pretrain.training.preflight import check_recipe_first
    from pretrain.training.progress import StepProgressBar
    from pretrain.training.resume import check_recipe, resolve, saved_recipe
    from pretrain.training.speed import Throughput
    from pretrain.training.summary import ModelOverview, RunSummary

    class SaveConfig(SaveConfigCallback):
        """Saves config.yaml beside the logs, and the same resolved recipe inside every checkpoint."""

        def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
            checkpoint["config"] = self.parser.dump(self.config, skip_none=False)

    class PretrainCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # the model reads the tokenizer's special ids once the data module exists (it may train the tokenizer)
            parser.link_arguments("data", "model.tokenizer", compute_fn=lambda data: data.hparams.tokenizer,
                                  apply_on="instantiate")
            parser.link_arguments("data.add_tokens", "model.add_tokens")  # the same tokens on both sides
            parser.add_lightning_class_args(Checkpoints, "checkpoint")
            parser.add_lightning_class_args(RunSummary, "summary")
            parser.add_lightning_class_args(Throughput, "throughput")

        def parse_arguments(self, parser, args) -> None:
            """A misspelt or abbreviated option: one line, with the nearest option, instead of the whole usage."""
            try:
                super().parse_arguments(parser, args)
            except ArgumentError as error:
                subcommands = parser._subcommands_action
                command = next((a for a in (args or sys.argv[1:]) if subcommands and a in subcommands.choices), None)
                chosen = subcommands.choices[command] if command else parser
                known = [o for action in chosen._actions for o in action.option_strings if o.startswith("--")]
                raise UserError(unknown_options(str(error), known, f"pretrain {command or ''}".strip())) from None

        def _parse_ckpt_path(self) -> None:
            """Off: Lightning's version replaces the model's settings with the checkpoint's, silently dropping this
            run's overrides; `before_instantiate_classes` checks the resume instead.

            One of the project's two uses of a private API (the other: `distributed.writes_sharded`):
            LightningCLI.__init__ (2.6 and later) calls this method before any public hook. tests/pretrain/test_cli.py
            fails loudly if Lightning renames it or stops calling it."""

        def before_instantiate_classes(self) -> None:
            """Before anything is built: resolve `--ckpt_path last` to this run's last.ckpt, verify the file, and
            compare this run's recipe with the checkpoint's (architecture changes refused, the rest said)."""
            if parse_only:
                raise _Parsed(self.config)
            config = self.config[self.subcommand] if self.subcommand else self.config
            self.run_dir = Path(config.trainer.default_root_dir or ".")
            config.checkpoint.dirpath = str(config.checkpoint.dirpath or self.run_dir / "checkpoints")
            if self.subcommand not in LIGHTNING_COMMANDS:
                return
            if config.get("weights_only") is False:
                raise UserError("--weights_only false would let a checkpoint run code as it is loaded; pretrain loads "
                                "checkpoints with weights_only=True only: drop the option")
            if config.model.get("init_from") and not config.data.get("tokenizer"):  # continued: the source's
                config.data.tokenizer = str(config.model.init_from)
            if self.subcommand == "fit":  # what the recipe alone shows, before any tokenizer, cache or directory
                check_recipe_first(config)
            if self.subcommand == "fit" or config.ckpt_path is not None:
                path = resolve(config.ckpt_path, Path(config.checkpoint.dirpath))
                config.ckpt_path = str(path) if path else None
                if path is not None:  # (read weights-only here: FSDP's own reader of a full file would not)
                    recipe = saved_recipe(path)
                    if self.subcommand == "fit":
                        self.data_changed = check_recipe(recipe, config.as_dict(), path)

        def after_instantiate_classes(self) -> None:
            super().after_instantiate_classes()
            self.model.check_data(self.datamodule)  # before the cache is built and before the first step
            if getattr(self, "data_changed", None):  # other data than the checkpoint's: it starts from its beginning
                self.datamodule.start_anew = self.data_changed

        def instantiate_trainer(self, **kwargs):
            section = self.config_init[self.subcommand] if self.subcommand else self.config_init
            trainer = section.get("trainer") or {}
            if trainer.get("logger") in (None, True):  # CSV and TensorBoard, in the same version directory
                csv = CSVLogger(self.run_dir, name="logs")
                kwargs["logger"] = [csv, TensorBoardLogger(self.run_dir, name="logs", version=csv.version,
                                                           default_hp_metric=False)]
            callbacks = list(trainer.get("callbacks") or [])
            if trainer.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar)
                                                                           for c in callbacks):
                # The bar reads the losses back from the device when it refreshes: at the logging steps only
                # (which read them anyway), not every step, so the host does not wait for the GPU each step.
                callbacks.append(StepProgressBar(refresh_rate=trainer.get("log_every_n_steps") or 50))
                kwargs["callbacks"] = callbacks
            if trainer.get("enable_model_summary") is not False:  # one line instead of Lightning's table
                kwargs["enable_model_summary"] = False
                kwargs["callbacks"] = [*kwargs.get("callbacks", callbacks), ModelOverview()]
            strategy = fsdp_strategy(trainer.get("strategy"), self.model)  # fsdp, fsdp_sharded: one unit per block
            if strategy is not None:
                kwargs["strategy"] = strategy
            # checkpoints are written by `checkpoint:` (Checkpoints) alone, through SafeCheckpointIO
            plugins = trainer.get("plugins") or []
            kwargs["plugins"] = [*(plugins if isinstance(plugins, list) else [plugins]), SafeCheckpointIO()]
            kwargs["enable_checkpointing"] = False
            return super().instantiate_trainer(**kwargs)

    if not sys.stderr.isatty():  # a log file: the cache's build is said in plain lines, not redrawn bars
        import datasets

        datasets.disable_progress_bars()
    try:
        with quiet_lightning():
            strict = {"exit_on_error": False, "allow_abbrev": False}  # (--trainer.max_step is not max_steps)
            return PretrainCLI(PretrainingModule, PretrainingDataModule, args=None if argv == sys.argv[1:] else argv,
                               save_config_callback=SaveConfig, save_config_kwargs={"overwrite": False},
                               seed_everything_default=0, run=run,
                               parser_kwargs=strict | {command: strict for command in LIGHTNING_COMMANDS} if run
                               else strict)
    except _Parsed as parsed:
        return parsed.config


def _not_a_tip(record: logging.LogRecord) -> bool:
    return "litlogger" not in record.getMessage()


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Without Lightning's messages that are not the user's business: its advertisement for a cloud logger, the
    LeafSpec deprecation Lightning itself triggers under newer torch, and the warning about args given besides
    sys.argv (this CLI gives the command line itself)."""
    tips = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    tips.addFilter(_not_a_tip)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
            warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter")
            yield
    finally:
        tips.removeFilter(_not_a_tip)
