"""`PretrainingModule`: one backbone, weighted objectives, one backbone forward per step."""

from __future__ import annotations

import dataclasses
import hashlib
import warnings

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import FSDPStrategy
from tokenizers import Tokenizer
from torch import Tensor, nn
from torchmetrics.aggregation import MeanMetric

from models import Transformer, TransformerConfig, head_spec
from objectives import Batch, Objective, ObjectiveOutput, ReplacedTokenDetection, TokenIds, check_combination
from objectives.base import backbone_inputs, corrupt_batch
from pretrain.data.tokenizer import add_tokens_from, check_vocabulary, load_tokenizer, special_ids
from pretrain.errors import UserError
from pretrain.training.optim import (
    OptimizerName,
    ScheduleName,
    build_optimizer,
    describe_groups,
    schedule_factor,
    skip_if_not_finite,
)
from pretrain.training.preflight import length_problem

# Settings a resumed run may change (applied to the restored optimizer and schedule, and said); the architecture,
# the objectives, the optimizer's kind and the tokenizer may not.
# how the backbone computes, not what: a resume may change them
COMPUTE_FIELDS = ("activation_checkpointing", "checkpoint_every", "attention_masks")
OPTIMIZER_SETTINGS = ("learning_rate", "weight_decay", "betas", "eps", "schedule", "warmup_steps", "warmup_ratio",
                      "total_steps")


class TrainingDiverged(UserError):
    """Too many consecutive steps had non-finite gradients: the run stops, its last good checkpoint intact."""


def token_ids(tokenizer: Tokenizer, vocab_size: int) -> TokenIds:
    check_vocabulary(tokenizer, vocab_size)
    size = tokenizer.get_vocab_size()
    if size < vocab_size:
        warnings.warn(f"the model's vocab_size ({vocab_size}) is larger than the tokenizer's vocabulary ({size}): "
                      f"{vocab_size - size} embedding rows are never used and random replacements draw from the "
                      f"tokenizer's {size} ids; set model.backbone.vocab_size {size} unless the rounding is deliberate",
                      stacklevel=2)
    special = special_ids(tokenizer)
    return TokenIds(mask=special.mask, special=special.all(), vocab_size=size)


class PretrainingModule(pl.LightningModule):
    """Pretrains `Transformer(backbone)` on the weighted sum of `objectives`' losses.

    Each step: every objective may corrupt the batch (those that move tokens first: `corrupt_batch`); the backbone
    runs once on the corrupted batch; every objective computes its loss on the shared hidden states. Logs each
    objective's loss and accuracy, perplexity for language-model objectives, the total loss and the learning rate.

    Args:
        backbone: the model's architecture.
        objectives: e.g. [MaskedLM(...), NextSentencePrediction()] for BERT; checked to be compatible.
        optimizer: adamw (no decay on biases and LayerNorm weights), radam, or lamb for large batches.
        learning_rate: the peak learning rate, reached after `warmup_steps`.
        schedule: linear (warm-up then linear decay), cosine, inverse_sqrt or constant.
        warmup_ratio: when given, the warm-up is this share of `total_steps` (or of the run's estimated steps) and
            `warmup_steps` is not used: a recipe's warm-up keeps its proportion when its budget changes (ELECTRA
            warms up over 1 % of its 1M steps, BERT 1 %, the DAPT papers 6 %; a budget of a few hundred steps needs
            a larger share: see the README's objectives comparison).
        total_steps: the length of the decay; by default the trainer's estimated number of steps (a resume keeps the
            length the run began with, saved in its checkpoint, and says so where its settings now give another).
        tokenizer: its [MASK] and special-token ids go to the objectives that corrupt tokens (unless they were given
            their own), and its vocabulary is checked against the backbone's; checkpoints carry a copy of it.
        seed: the corruption (masks, random tokens, sampled replacements) of micro-batch m of training step s on rank
            r is drawn from a generator seeded with (seed, r, s, m), and validation batch i's from (seed, r, i): a
            resumed run draws exactly what an uninterrupted one would, every micro-batch of an accumulated step draws
            its own, and every validation sees the same masks.
        compile: `torch.compile` the backbone, each objective's head and loss, and any network that serves the
            corruption (ELECTRA's generator): each a single graph (static shapes, no host sync, no graph break). The
            corruption's random draws run eagerly (they use a seeded generator, which graphs do not take). Best on
            GPUs; the first training steps and the first validation pay the compilation.
        init_from: continue pretraining a model that exists: a Hugging Face directory of any family
            `pretrain.load` reads, a directory written by `pretrain export`, or a checkpoint of `pretrain fit` (a new
            run from its weights, not a resume). The architecture comes from it (`backbone` may be left out; one
            that disagrees is refused), its backbone weights are loaded, and so is each head of the objectives that
            the source has under the same name (mlm, nsp, sop, rtd, clm); the others start fresh. What was loaded,
            what is new and what of the source is not used is printed before the first step.
        init_generator_from: ELECTRA's generator to continue (a Hugging Face ElectraForMaskedLM directory, ...) beside
            the discriminator of `init_from`; by default the directory Google's and Hugging Face's releases put
            beside it (electra-*-discriminator -> electra-*-generator) when there is one, else a fresh generator.
            Its size comes from it; the embeddings stay the discriminator's (ELECTRA shares them).
        add_tokens: domain tokens added to the tokenizer (`data.add_tokens`, linked): with `init_from`, the
            embeddings grow by as many rows, each the mean of the source's rows.
        max_skipped_steps: a step whose gradient norm is not finite (a NaN or infinite loss) is skipped on the device
            (weights and optimizer state unchanged; no host sync) and counted; the run stops, with its last good
            checkpoint intact, once this many steps in a row were skipped (read at the logging steps and at the end).
            The trainer's
            `gradient_clip_val` clips the gradient norm in the same pass; `train/grad_norm` is logged.
    """

    def __init__(
        self,
        backbone: TransformerConfig | None = None,
        objectives: list[Objective] | None = None,
        optimizer: OptimizerName = "adamw",
        learning_rate: float = 1e-4,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        schedule: ScheduleName = "linear",
        warmup_steps: int = 10_000,
        warmup_ratio: float | None = None,
        total_steps: int | None = None,
        tokenizer: str | None = None,
        seed: int = 0,
        compile: bool = False,
        max_skipped_steps: int = 10,
        init_from: str | None = None,
        init_generator_from: str | None = None,
        add_tokens: str | None = None,
    ):
        super().__init__()
        if not objectives:
            raise UserError("model.objectives is empty: give at least one objective (e.g. objectives.MaskedLM)")
        loaded = load_tokenizer(tokenizer) if tokenizer else None
        if loaded is not None and add_tokens:  # the data's domain tokens (`data.add_tokens`, linked)
            add_tokens_from(loaded, add_tokens)
        source = generator_source = skipped = None
        electra = next((o for o in objectives if isinstance(o, ReplacedTokenDetection)), None)
        if init_from is not None or init_generator_from is not None:  # continued pretraining: from the source
            from pretrain.training import init_from as continued

            given = init_generator_from
            init_generator_from = continued.generator_path(init_from, init_generator_from, electra is not None)
            source = continued.load_source(init_from)
            if init_generator_from is not None:
                generator_source = continued.load_source(init_generator_from, "model.init_generator_from")
            for model, path, option in ((source, init_from, "model.init_from"),
                                        (generator_source, init_generator_from, "model.init_generator_from")):
                if loaded is not None and model is not None:
                    continued.tokenizer_fits(loaded, model.tokenizer, tokenizer, path, option)
                    continued.grow_vocabulary(model.model, loaded.get_vocab_size())  # tokens added here: new rows
            backbone = continued.source_architecture(source.config, backbone, init_from)
            if generator_source is not None:
                try:
                    electra.generator_size = continued.generator_size(generator_source.config, backbone,
                                                                      electra.generator_size, init_generator_from)
                except UserError as error:
                    if given is not None:
                        raise
                    # the generator found beside the discriminator does not fit the recipe: a fresh one, said
                    skipped = f"  not used: {init_generator_from}, found beside it ({error})"
                    generator_source = None
        elif backbone is None:
            raise UserError("model.backbone is missing: give the architecture (see configs/), or model.init_from to "
                            "continue a model that exists")
        if max_skipped_steps < 1:
            raise UserError(f"max_skipped_steps must be at least 1, got {max_skipped_steps}")
        if warmup_ratio is not None and not 0.0 <= warmup_ratio < 1.0:
            raise UserError(f"model.warmup_ratio must be in [0, 1) (a share of the steps), got {warmup_ratio}")
        check_combination(objectives, backbone)
        self.save_hyperparameters(ignore=["backbone", "objectives"])
        self.hparams["backbone"] = dataclasses.asdict(backbone)
        self.backbone = Transformer(backbone)
        self.tokenizer_json = loaded.to_str() if loaded else None
        tokens = token_ids(loaded, backbone.vocab_size) if loaded else None
        for objective in objectives:
            objective.bind(self.backbone, tokens)
        self.objectives = nn.ModuleList(objectives)
        self.init_report: list[str] = []
        if source is not None:
            self.init_report = continued.load_weights(self.backbone, self.heads(), source, init_from)
            if generator_source is not None:
                self.init_report += continued.load_generator(electra.generator, electra.generator_mlm.head,
                                                             generator_source, init_generator_from)
            elif electra is not None:
                self.init_report.append("  new (fresh weights): ELECTRA's generator (model.init_generator_from "
                                        "continues a released one)")
            if skipped:
                self.init_report.append(skipped)
            print("\n".join(self.init_report), flush=True)
        self.accuracy = nn.ModuleDict({
            f"{stage}_{o.name}": MeanMetric(nan_strategy="disable") for stage in ("train", "val") for o in objectives
        })
        if compile:  # in place: the state dict keeps its keys
            for module in [self.backbone, *self.objectives.modules()]:
                if isinstance(module, (Objective, Transformer)):
                    module.compile()
        self._generators: dict[torch.device, torch.Generator] = {}
        self._rng_to_restore: dict[str, Tensor] | None = None
        self._micro_batch = (-1, 0)  # (global step, micro-batch of it) of the latest training batch
        self._skipped = self._streak = torch.zeros((), dtype=torch.long)  # skipped steps: in all, in a row
        self._checked_step = -1
        self._resumed_from: dict | None = None  # the checkpoint's hyper-parameters, on a resume
        self._sizes = {name: p.numel() for name, p in self.named_parameters()}  # whole, before any sharding
        self._printed_groups = False
        self._schedule: dict | None = None  # the resolved warm-up and decay length, and the trainer settings behind
        self._saved_schedule: dict | None = None  # the checkpoint's, on a resume: its decay length is kept

    def forward(self, batch: Batch, generator: torch.Generator | None = None
                ) -> tuple[Tensor, dict[str, ObjectiveOutput]]:
        """The weighted total loss of one step and each objective's output; `generator` draws the corruption."""
        batch = corrupt_batch(self.objectives, batch, generator)  # tokens moved first, then masked: labels stay put
        hidden_states = self.backbone(batch["input_ids"], **backbone_inputs(batch))
        outputs = {objective.name: objective(hidden_states, batch) for objective in self.objectives}
        total = sum(objective.weight * outputs[objective.name].loss for objective in self.objectives)
        return total, outputs

    def corruption_generator(self, device: torch.device, *key: int) -> torch.Generator:
        """A generator on `device` seeded with a hash of (seed, rank, *key): no state to save, nothing shared with
        dropout's global RNG."""
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        digest = hashlib.blake2b(repr((self.hparams.seed, self.global_rank, *key)).encode(), digest_size=8).digest()
        return generator.manual_seed(int.from_bytes(digest, "little") >> 1)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        step, micro = self._micro_batch
        self._micro_batch = (self.global_step, micro + 1 if step == self.global_step else 0)
        generator = self.corruption_generator(batch["input_ids"].device, 0, *self._micro_batch)
        loss, outputs = self(batch, generator)
        self._log_outputs("train", loss, outputs)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss, outputs = self(batch, self.corruption_generator(batch["input_ids"].device, 1, batch_idx))
        self._log_outputs("val", loss, outputs)
        return loss

    def _log_outputs(self, stage: str, loss: Tensor, outputs: dict[str, ObjectiveOutput]) -> None:
        """Tensors only, handed to Lightning: no host sync in the step."""
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=on_step, on_epoch=not on_step)
        for objective in self.objectives:
            name, output = objective.name, outputs[objective.name]
            self.log(f"{stage}/{name}_loss", output.loss, on_step=on_step, on_epoch=not on_step)
            metric = self.accuracy[f"{stage}_{name}"]
            counted = output.counted if output.counted is not None else torch.ones_like(output.correct)
            metric(output.correct, counted)
            self.log(f"{stage}/{name}_accuracy", metric, on_step=on_step, on_epoch=not on_step)
            if objective.language_model:
                self.log(f"{stage}/{name}_perplexity", output.loss.detach().exp(), on_step=on_step,
                         on_epoch=not on_step)
            for key, value in output.extra.items():
                self.log(f"{stage}/{name}_{key}", value, on_step=on_step, on_epoch=not on_step)

    def configure_optimizers(self):
        hp = self.hparams
        strategy = self._trainer.strategy if self._trainer is not None else None
        if hp.optimizer == "lamb" and isinstance(strategy, FSDPStrategy) and strategy.world_size > 1:
            raise UserError("model.optimizer lamb scales each update by the norm of the whole tensor, and under FSDP "
                            "each rank holds a shard of it: use adamw, or the ddp strategy for LAMB")
        optimizer = build_optimizer(hp.optimizer, self, hp.learning_rate, hp.weight_decay, tuple(hp.betas), hp.eps)
        if self._trainer is not None and self.trainer.is_global_zero and not self._printed_groups:
            print(f"optimizer {hp.optimizer}: {describe_groups(self, hp.weight_decay, self._sizes)}", flush=True)
            self._printed_groups = True
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_factor(hp.schedule, *self.schedule_steps()))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def schedule_steps(self) -> tuple[int, int | None]:
        """(warm-up steps, decay length): `total_steps`, or the trainer's estimate where a decay or `warmup_ratio`
        needs the run's length."""
        hp = self.hparams
        total_steps = hp.total_steps
        if total_steps is None and (hp.schedule in ("linear", "cosine") or hp.warmup_ratio is not None):
            saved = (self._saved_schedule or {}).get("total_steps")  # a resumed run keeps the decay it began with
            total_steps = saved if saved is not None else int(self.trainer.estimated_stepping_batches)
        warmup_steps = hp.warmup_steps if hp.warmup_ratio is None else round(hp.warmup_ratio * total_steps)
        self._schedule = {"warmup_steps": warmup_steps, "total_steps": total_steps,
                          "trainer": self._schedule_settings()}
        return warmup_steps, total_steps

    def _schedule_settings(self) -> dict:
        """The trainer settings the estimated number of steps follows from, as the user gives them (none without a
        trainer: the module used on its own)."""
        trainer = self._trainer
        if trainer is None:
            return {}
        return {"trainer.max_steps": trainer.max_steps, "trainer.max_epochs": trainer.max_epochs,
                "devices x num_nodes": trainer.world_size,
                "trainer.accumulate_grad_batches": trainer.accumulate_grad_batches}

    def _schedule_kept_note(self) -> str | None:
        """On a resume that keeps the checkpoint's decay length: the one line that says so, where this run's settings
        would have given another (max_steps, devices, nodes, accumulation, or the data)."""
        saved = self._saved_schedule
        if not saved or self.hparams.total_steps is not None or saved.get("total_steps") is None:
            return None
        estimate = int(self.trainer.estimated_stepping_batches)
        if estimate == saved["total_steps"]:
            return None
        now = self._schedule_settings()
        differ = [f"{key} {saved.get('trainer', {}).get(key)!r} -> {value!r}" for key, value in now.items()
                  if saved.get("trainer", {}).get(key) != value]
        return (f"note: the learning-rate schedule keeps the decay over {saved['total_steps']:,} steps this run began "
                f"with; its settings now ({', '.join(differ) or 'the data'}) would give {estimate:,}: give "
                f"--model.total_steps {estimate} to decay over those instead")

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Runs before every optimizer step: the gradient norm (clipped to `gradient_clip_val` where given), and the
        non-finite guard: a step whose norm is not finite is skipped on the device and counted, without a host sync
        (see `max_skipped_steps`)."""
        parameters = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not parameters:
            return
        if gradient_clip_val and gradient_clip_algorithm == "value":
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
        if isinstance(self.trainer.strategy, FSDPStrategy):  # each rank holds a shard: the norm of all of them
            squared = norm.pow(2)
            torch.distributed.all_reduce(squared)
            norm = squared.sqrt()
        if gradient_clip_val and gradient_clip_algorithm != "value":
            torch.nn.utils.clip_grads_with_norm_(parameters, gradient_clip_val, norm)
        not_finite = ~norm.isfinite()
        skip_if_not_finite(optimizer, parameters, not_finite)
        self._skipped = self._skipped.to(norm.device) + not_finite
        self._streak = (self._streak.to(norm.device) + 1) * not_finite
        self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        self.log("train/skipped_steps", self._skipped.float(), on_step=True, on_epoch=False)

    def on_train_batch_end(self, outputs, batch: Batch, batch_idx: int) -> None:
        """At the logging steps (where Lightning reads the logged values from the device anyway): stop the run if
        the last `max_skipped_steps` steps were all skipped."""
        step = self.global_step
        if step % self.trainer.log_every_n_steps == 0 and step != self._checked_step:
            self._checked_step = step
            self._stop_if_diverged()

    def on_train_end(self) -> None:
        self._stop_if_diverged()

    def _stop_if_diverged(self) -> None:
        streak = int(self._streak)
        if streak >= self.hparams.max_skipped_steps:
            raise TrainingDiverged(
                f"stopped at step {self.global_step}: the last {streak} steps had a non-finite loss or gradient (NaN "
                "or inf) and were skipped; no checkpoint was written from them, the last one before them is intact. "
                "Lower model.learning_rate, raise model.warmup_steps or clip gradients (--trainer.gradient_clip_val "
                "1.0), then resume with --ckpt_path last")

    def skipping(self) -> bool:
        """Whether the latest step was skipped for a non-finite gradient (one host sync)."""
        return bool(self._streak > 0)

    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients so far in this run, resumes included (one host sync)."""
        return int(self._skipped)

    def check_data(self, data: pl.LightningDataModule) -> None:
        """Refuse, before the first step, data that these objectives and this backbone cannot train on: the
        objectives' `data_requirements` (a pair task on packed blocks, whole-word masking without word starts, ...),
        examples longer than the learned positions, a tokenizer that makes ids outside the vocabulary."""
        from objectives.base import data_mismatches

        settings = dict(getattr(data, "hparams", {}))
        problems = data_mismatches(list(self.objectives), settings)
        config = self.backbone.config
        problems += length_problem(settings.get("max_length"), config.max_position_embeddings,
                                   config.position_embedding)
        tokenizer = getattr(data, "tokenizer", None)
        if isinstance(tokenizer, Tokenizer) and tokenizer.get_vocab_size() > config.vocab_size:
            problems.append(f"the data's tokenizer has {tokenizer.get_vocab_size()} tokens but the model's vocab_size "
                            f"is {config.vocab_size}: set model.backbone.vocab_size {tokenizer.get_vocab_size()}")
        if problems:
            raise UserError("; ".join(problems))

    def setup(self, stage: str) -> None:
        if self.trainer.datamodule is not None:
            self.check_data(self.trainer.datamodule)

    def heads(self) -> dict[str, nn.Module]:
        """Every objective's heads by name (`Objective.heads`), as `ModelWithHeads` and the exports name them."""
        heads: dict[str, nn.Module] = {}
        for objective in self.objectives:
            heads |= objective.heads()
        return heads

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """What `pretrain.load` and `pretrain export` need besides the weights, the RNG state for exact resume
        (dropout draws from torch's global generators), and the skipped-step counts."""
        checkpoint["pretrain"] = {
            "backbone": self.hparams["backbone"], "tokenizer": self.tokenizer_json,
            "heads": {name: self._prefix_of(head) for name, head in self.heads().items()},
            "head_specs": {name: head_spec(head) for name, head in self.heads().items()},
            "skipped_steps": int(self._skipped), "skip_streak": int(self._streak),
            "schedule": self._schedule,  # the decay length a resume keeps (unless model.total_steps is given)
        }
        checkpoint["rng"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def _prefix_of(self, module: nn.Module) -> str:
        return next(name for name, m in self.named_modules() if m is module)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of another architecture, objectives, optimizer or tokenizer (one line naming what
        differs); keep its RNG state and skip counts; its optimizer settings are compared at the start of training."""
        saved = checkpoint.get("pretrain", {})
        hparams = checkpoint.get("hyper_parameters", {})
        problems = [f"model.backbone.{key} is {value!r} in the checkpoint and {self.hparams['backbone'].get(key)!r} "
                    "now" for key, value in (saved.get("backbone") or {}).items()
                    if self.hparams["backbone"].get(key) != value and key not in COMPUTE_FIELDS]
        if "heads" in saved and sorted(saved["heads"]) != sorted(self.heads()):
            problems.append(f"the objectives are {sorted(saved['heads'])} in the checkpoint and {sorted(self.heads())} "
                            "now")
        if hparams.get("optimizer", self.hparams.optimizer) != self.hparams.optimizer:
            problems.append(f"model.optimizer is {hparams['optimizer']!r} in the checkpoint and "
                            f"{self.hparams.optimizer!r} now")
        if saved.get("tokenizer") and self.tokenizer_json and saved["tokenizer"] != self.tokenizer_json:
            problems.append("the tokenizer differs from the one the checkpoint was trained with")
        problems += shared_weight_conflicts(self, checkpoint.get("state_dict", {}))
        if problems:
            raise UserError("cannot resume: " + "; ".join(problems) + ". A resumed run keeps what it was trained with: "
                            "drop the override, or start a new run in another --trainer.default_root_dir")
        self._rng_to_restore = checkpoint.get("rng")
        self._skipped = torch.tensor(saved.get("skipped_steps", 0))
        self._streak = torch.tensor(saved.get("skip_streak", 0))
        self._resumed_from = hparams
        self._saved_schedule = saved.get("schedule")

    def on_train_start(self) -> None:
        """On a resume, apply the optimizer settings that differ from the checkpoint's to the restored optimizer and
        schedule, and say so (the restored state would otherwise keep the old ones silently); say that the decay
        length is the checkpoint's where this run's settings would have given another."""
        saved, self._resumed_from = self._resumed_from, None
        if not saved:
            return
        note = self._schedule_kept_note()
        if note and self.trainer.is_global_zero:
            print(note, flush=True)
        hp = self.hparams
        changed = [key for key in OPTIMIZER_SETTINGS if key in saved and _plain(saved[key]) != _plain(hp[key])]
        # (FSDP restores the checkpoint after the optimizer and schedule were built: the saved decay length is
        # applied here)
        late = (hp.total_steps is None and (self._saved_schedule or {}).get("total_steps") is not None
                and (self._schedule or {}).get("total_steps") != self._saved_schedule["total_steps"])
        if not changed and not late:
            return
        optimizer, scheduler = self.optimizers().optimizer, self.lr_schedulers()
        for group in optimizer.param_groups:
            group["betas"], group["eps"] = tuple(hp.betas), hp.eps
        optimizer.param_groups[0]["weight_decay"] = hp.weight_decay  # the decayed group (see parameter_groups)
        fresh = self.configure_optimizers()["lr_scheduler"]["scheduler"]  # the schedule of the current settings
        scheduler.lr_lambdas, scheduler.base_lrs = fresh.lr_lambdas, [hp.learning_rate] * len(scheduler.base_lrs)
        for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
            group["initial_lr"] = hp.learning_rate
            group["lr"] = hp.learning_rate * factor(scheduler.last_epoch)
        if self.trainer.is_global_zero:
            for key in changed:
                print(f"note: resuming with model.{key} {hp[key]!r} (the checkpoint had {saved[key]!r})", flush=True)

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        """On the first step after a resume, continue the global RNG streams where the saved run left them."""
        if self._rng_to_restore is None:
            return
        torch.set_rng_state(self._rng_to_restore["torch"])
        if "cuda" in self._rng_to_restore and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self._rng_to_restore["cuda"])
        self._rng_to_restore = None


def shared_weight_conflicts(module: nn.Module, state_dict: dict) -> list[str]:
    """Weights that `module` shares between two places (ELECTRA's embeddings, ALBERT's layers) but `state_dict` holds
    as two different tensors: a checkpoint of a version that did not share them (ELECTRA's generator had its own
    embedding LayerNorm until the whole embeddings were shared as in Google's code). One line each."""
    names: dict[int, list[str]] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), []).append(name)
    conflicts = []
    for first, *others in (group for group in names.values() if len(group) > 1):
        for other in others:
            a, b = state_dict.get(first), state_dict.get(other)
            if isinstance(a, Tensor) and isinstance(b, Tensor) and not torch.equal(a, b):
                conflicts.append(f"{first} and {other} are one weight now but two different ones in the checkpoint "
                                 "(written before they were shared)")
    return conflicts


def _plain(value):
    return list(value) if isinstance(value, (tuple, list)) else value
