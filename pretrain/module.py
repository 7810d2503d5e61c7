"""`PretrainingModule`: one backbone, weighted objectives, one backbone forward per step."""

from __future__ import annotations

import dataclasses

import pytorch_lightning as pl
import torch
from tokenizers import Tokenizer
from torch import Tensor, nn
from torchmetrics.aggregation import MeanMetric

from models import Transformer, TransformerConfig
from objectives import Batch, Objective, ObjectiveOutput, TokenIds, check_combination
from objectives.base import backbone_inputs
from pretrain.optim import OptimizerName, ScheduleName, build_optimizer, schedule_factor
from pretrain.tokenizer import check_vocabulary, load_tokenizer, special_ids


def token_ids(tokenizer: Tokenizer, vocab_size: int) -> TokenIds:
    check_vocabulary(tokenizer, vocab_size)
    special = special_ids(tokenizer)
    return TokenIds(mask=special.mask, special=special.all())


class PretrainingModule(pl.LightningModule):
    """Pretrains `Transformer(backbone)` on the weighted sum of `objectives`' losses.

    Each step: every objective may corrupt the batch; the backbone runs once on the corrupted batch; every
    objective computes its loss on the shared hidden states. Logs each objective's loss and accuracy, perplexity for
    language-model objectives, the total loss and the learning rate.

    Args:
        backbone: the model's architecture.
        objectives: e.g. [MaskedLM(...), NextSentencePrediction()] for BERT; checked to be compatible.
        optimizer: adamw (no decay on biases and LayerNorm weights), radam, or lamb for large batches.
        learning_rate: the peak learning rate, reached after `warmup_steps`.
        schedule: linear (warm-up then linear decay), cosine, inverse_sqrt or constant.
        total_steps: the length of the decay; by default the trainer's estimated number of steps.
        tokenizer: its [MASK] and special-token ids go to the objectives that corrupt tokens (unless they were given
            their own), and its vocabulary is checked against the backbone's; checkpoints carry a copy of it.
        seed: the corruption (masks, random tokens, sampled replacements) of training step s on rank r is drawn
            from a generator seeded with (seed, r, s), and validation batch i's from (seed, r, i): a resumed run
            draws exactly what an uninterrupted one would, and every validation sees the same masks.
        compile: `torch.compile` the backbone, each objective's head and loss, and any network that serves the
            corruption (ELECTRA's generator): each a single graph (static shapes, no host sync, no graph break). The
            corruption's random draws run eagerly (they use a seeded generator, which graphs do not take). Best on
            GPUs; the first training steps and the first validation pay the compilation.
    """

    def __init__(
        self,
        backbone: TransformerConfig,
        objectives: list[Objective],
        optimizer: OptimizerName = "adamw",
        learning_rate: float = 1e-4,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        schedule: ScheduleName = "linear",
        warmup_steps: int = 10_000,
        total_steps: int | None = None,
        tokenizer: str | None = None,
        seed: int = 0,
        compile: bool = False,
    ):
        super().__init__()
        check_combination(objectives, backbone)
        self.save_hyperparameters(ignore=["backbone", "objectives"])
        self.hparams["backbone"] = dataclasses.asdict(backbone)
        self.backbone = Transformer(backbone)
        loaded = load_tokenizer(tokenizer) if tokenizer else None
        self.tokenizer_json = loaded.to_str() if loaded else None
        tokens = token_ids(loaded, backbone.vocab_size) if loaded else None
        for objective in objectives:
            objective.bind(self.backbone, tokens)
        self.objectives = nn.ModuleList(objectives)
        self.accuracy = nn.ModuleDict({
            f"{stage}_{o.name}": MeanMetric(nan_strategy="disable") for stage in ("train", "val") for o in objectives
        })
        if compile:  # in place: the state dict keeps its keys
            for module in [self.backbone, *self.objectives.modules()]:
                if isinstance(module, (Objective, Transformer)):
                    module.compile()
        self._generators: dict[torch.device, torch.Generator] = {}
        self._rng_to_restore: dict[str, Tensor] | None = None

    def forward(self, batch: Batch, generator: torch.Generator | None = None
                ) -> tuple[Tensor, dict[str, ObjectiveOutput]]:
        """The weighted total loss of one step and each objective's output; `generator` draws the corruption."""
        for objective in self.objectives:
            batch = objective.corrupt(batch, generator)
        hidden_states = self.backbone(batch["input_ids"], **backbone_inputs(batch))
        outputs = {objective.name: objective(hidden_states, batch) for objective in self.objectives}
        total = sum(objective.weight * outputs[objective.name].loss for objective in self.objectives)
        return total, outputs

    def corruption_generator(self, device: torch.device, stream: int, index: int) -> torch.Generator:
        """A generator on `device` seeded with (seed, rank, stream, index): no state to save, nothing shared with
        dropout's global RNG."""
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return generator.manual_seed((self.hparams.seed << 40) ^ (rank << 32) ^ (stream << 31) ^ index)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        generator = self.corruption_generator(batch["input_ids"].device, 0, self.global_step)
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
        optimizer = build_optimizer(hp.optimizer, self, hp.learning_rate, hp.weight_decay, tuple(hp.betas), hp.eps)
        total_steps = hp.total_steps
        if total_steps is None and hp.schedule in ("linear", "cosine"):  # only decays need the run's length
            total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, schedule_factor(hp.schedule, hp.warmup_steps, total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def heads(self) -> dict[str, nn.Module]:
        """The objectives' heads by objective name, as `ModelWithHeads` and the Hugging Face export name them."""
        return {o.name: o.head for o in self.objectives}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """What `pretrain.load` and `pretrain export` need besides the weights, and the RNG state for exact resume
        (dropout draws from torch's global generators)."""
        checkpoint["pretrain"] = {
            "backbone": self.hparams["backbone"], "tokenizer": self.tokenizer_json,
            "heads": {name: self._prefix_of(head) for name, head in self.heads().items()},
        }
        checkpoint["rng"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def _prefix_of(self, module: nn.Module) -> str:
        return next(name for name, m in self.named_modules() if m is module)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._rng_to_restore = checkpoint.get("rng")

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        """On the first step after a resume, continue the global RNG streams where the saved run left them."""
        if self._rng_to_restore is None:
            return
        torch.set_rng_state(self._rng_to_restore["torch"])
        if "cuda" in self._rng_to_restore and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self._rng_to_restore["cuda"])
        self._rng_to_restore = None
