"""Replaced-token detection (ELECTRA): a small generator fills the masks, the discriminator spots the replacements."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from models import TokenScorer, Transformer, TransformerConfig
from models.config import ConfigError
from objectives.base import (
    Batch,
    Objective,
    ObjectiveOutput,
    TokenIds,
    backbone_inputs,
    label_cross_entropy,
    mean_cosine_similarity,
    resolve_masking_ids,
)
from objectives.masking import IGNORE_INDEX
from objectives.mlm import MaskedLM


def generator_config(config: TransformerConfig, size: float) -> TransformerConfig:
    """The discriminator's config with hidden size, FFN size and heads scaled by `size` (the ELECTRA paper's
    generator multiplier: 1/4 for small, 1/3 for base), the same depth and embedding size."""
    hidden, heads = round(config.hidden_size * size), max(1, round(config.num_heads * size))
    if hidden < 1 or hidden % heads:
        raise ConfigError(f"generator_size={size} gives hidden size {hidden} and {heads} heads, which do not divide; "
                         "choose a size that keeps hidden_size * size divisible by num_heads * size")
    kv_heads = heads if config.num_kv_heads == config.num_heads else max(1, round(config.num_kv_heads * size))
    return dataclasses.replace(config, hidden_size=hidden, num_heads=heads, num_kv_heads=kv_heads,
                               intermediate_size=round(config.intermediate_size * size))


class ReplacedTokenDetection(Objective):
    """ELECTRA. The generator (owned here) is a smaller Transformer sharing the discriminator's embeddings (tables
    and LayerNorm, as Google's code shares them); its MLM loss trains it. Its samples (softmax / `temperature`, no
    gradient through the sampling) replace the masked tokens; the discriminator (the backbone, kept for fine-tuning)
    labels every real token as replaced or not. loss = generator MLM loss + `discriminator_weight` * discriminator
    loss. Logged besides: the discriminator's accuracy on replaced and on original tokens (a discriminator that says
    "original" everywhere scores 1 - replaced_fraction in aggregate) and the mean cosine similarity of its token
    states (near 1: collapsed).
    ELECTRA masks with [MASK] 85 % of the time and keeps the token otherwise (`replace_probs`).
    `generator_size` scales the generator's width (default 0.25; a run continued from a released generator,
    `model.init_generator_from`, takes that generator's).
    """

    name = "rtd"
    corrupts_tokens = True

    def __init__(
        self,
        mask_token_id: int | None = None,
        special_ids: Sequence[int] | None = None,
        generator_size: float | None = None,
        mask_prob: float = 0.15,
        replace_probs: tuple[float, float, float] = (0.85, 0.0, 0.15),
        temperature: float = 1.0,
        discriminator_weight: float = 50.0,
        weight: float = 1.0,
    ):
        super().__init__(weight)
        if temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {temperature}")
        # The generator is a small MLM model: its masking, output layer and loss are MaskedLM's.
        self.generator_mlm = MaskedLM(mask_token_id, special_ids, mask_prob, replace_probs)
        self.generator_size = generator_size  # None: 0.25, or the size of the generator a run continues from
        self.temperature = temperature
        self.discriminator_weight = discriminator_weight

    def bind(self, backbone: Transformer, tokens: TokenIds | None = None) -> None:
        mask, special = resolve_masking_ids("ReplacedTokenDetection", self.generator_mlm.mask_token_id,
                                            self.generator_mlm.special_ids, tokens)
        self.generator = Transformer(generator_config(backbone.config, self.generator_size or 0.25))
        # Google's ELECTRA shares the whole embeddings scope: token, position and segment tables and the embedding
        # LayerNorm (the same modules, hence the same tensors); each network keeps its own projection to its width.
        for name, module in backbone.embeddings.named_children():
            if name != "projection":
                setattr(self.generator.embeddings, name, module)
        # its head: the shared word embeddings
        self.generator_mlm.bind(self.generator, TokenIds(mask, special, tokens.vocab_size if tokens else None))
        self.head = TokenScorer(backbone)  # the discriminator's

    def output_layer_share(self) -> float:
        return self.generator_mlm.output_layer_share()  # the generator's output layer, at its masked positions

    def corrupt(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        original = batch["input_ids"]
        masked = self.generator_mlm.corrupt(batch, generator)
        hidden = self.generator(masked["input_ids"], **backbone_inputs(batch))
        # The generator's predictions at a static number of places per row (BERT's count rule): no host sync.
        logits, labels, positions = self.generator_mlm.predict(hidden, masked["mlm_labels"])  # (B * k, V), (B * k,)
        logits = logits.float()
        generator_loss, generator_correct = label_cross_entropy(logits, labels)  # logits are read again below
        with torch.no_grad():  # sampling is not differentiable: the discriminator's loss never reaches the generator
            probabilities = torch.softmax(logits / self.temperature, dim=-1)
            sampled = torch.multinomial(probabilities, 1, generator=generator).view(positions.shape)
        used = labels.view(positions.shape) != IGNORE_INDEX  # the other places are filler: they keep their tokens
        corrupted = original.scatter(1, positions, torch.where(used, sampled, original.gather(1, positions)))
        replaced = corrupted != original  # a sample equal to the original counts as not replaced
        return {**batch, "input_ids": corrupted, "rtd_labels": replaced.float(), "rtd_generator_loss": generator_loss,
                "rtd_generator_correct": generator_correct.sum() / used.sum().clamp(min=1)}

    def forward(self, hidden_states: torch.Tensor, batch: Batch) -> ObjectiveOutput:
        logits = self.head(hidden_states).float()  # (B, T)
        labels = batch["rtd_labels"]
        real = batch["attention_mask"].float() if "attention_mask" in batch else torch.ones_like(labels)
        per_token = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        discriminator_loss = (per_token * real).sum() / real.sum()
        loss = batch["rtd_generator_loss"] + self.discriminator_weight * discriminator_loss
        correct = ((logits > 0).float() == labels).float()
        replaced, original = labels * real, (1 - labels) * real
        return ObjectiveOutput(loss, correct.flatten(), counted=real.flatten(), extra={
            "generator_loss": batch["rtd_generator_loss"], "discriminator_loss": discriminator_loss,
            "generator_accuracy": batch["rtd_generator_correct"],
            "replaced_fraction": replaced.sum() / real.sum(),
            # the aggregate accuracy hides a discriminator that says "original" everywhere: each side on its own
            "replaced_accuracy": (correct * replaced).sum() / replaced.sum().clamp(min=1),
            "original_accuracy": (correct * original).sum() / original.sum().clamp(min=1),
            "token_similarity": mean_cosine_similarity(hidden_states.detach(), real),
        })
