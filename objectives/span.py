"""Span masking with the span-boundary objective (SpanBERT, Joshi et al. 2020): contiguous spans of whole words are
masked, and each masked token is predicted from its context (MLM) and from the span's two boundary tokens alone."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor, nn

from models import Head, LMHead, Transformer
from models.config import ConfigError
from models.transformer import activation_module, init_weights
from objectives.base import (
    Batch,
    Objective,
    ObjectiveOutput,
    TokenIds,
    label_cross_entropy,
    replacement_vocab_size,
    resolve_masking_ids,
)
from objectives.masking import (
    IGNORE_INDEX,
    gather_at,
    max_selected,
    positions_like,
    random_non_special,
    selected_positions,
)

ROUNDS = 8  # passes over the candidate spans when filling the budget (about 14 % selected of a 15 % budget)


class SpanBoundaryHead(Head):
    """SpanBERT's boundary predictor: a token from the hidden states of the two tokens around its span and its
    position in the span, y = LN(GeLU(W2 LN(GeLU(W1 [x_left; x_right; p])))), then the tied output embeddings.
    Called with hidden states alone (B, T, H), each token is predicted from its two neighbours at position 1."""

    def __init__(self, backbone: Transformer, max_position: int = 32):
        super().__init__(max_position=max_position)
        config = backbone.config
        self.positions = nn.Embedding(max_position + 1, config.hidden_size)  # 1..max_position; longer spans clip
        self.mlp = nn.Sequential(
            nn.Linear(3 * config.hidden_size, config.hidden_size), activation_module("gelu"),
            nn.LayerNorm(config.hidden_size, config.layer_norm_eps),
            nn.Linear(config.hidden_size, config.token_embedding_size), activation_module("gelu"),
            nn.LayerNorm(config.token_embedding_size, config.layer_norm_eps),
        )
        self.weight = backbone.embeddings.word.weight  # tied, as the MLM head's
        self.bias = nn.Parameter(self.weight.new_zeros(config.vocab_size))
        self.apply(partial(init_weights, std=config.initializer_range))

    def forward(self, hidden_states: Tensor, left: Tensor | None = None, right: Tensor | None = None,
                position: Tensor | None = None) -> Tensor:
        """left, right (N, H), position (N,) -> logits (N, V); or hidden_states (B, T, H) alone -> (B, T, V)."""
        if left is None:
            padded = nn.functional.pad(hidden_states, (0, 0, 1, 1))
            left, right = padded[:, :-2], padded[:, 2:]
            position = torch.ones(hidden_states.shape[:-1], dtype=torch.long, device=hidden_states.device)
        features = torch.cat([left, right, self.positions(position.clamp(max=self.positions.num_embeddings - 1))], -1)
        return nn.functional.linear(self.mlp(features), self.weight, self.bias)


def span_mask(
    input_ids: Tensor, word_starts: Tensor, *, special_ids: Sequence[int], mask_prob: float = 0.15,
    geometric_p: float = 0.2, max_span_words: int = 10, generator: torch.Generator | None = None,
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """SpanBERT's selection, vectorised on the device: span lengths in words ~ Geometric(`geometric_p`) clipped at
    `max_span_words`, each span starting at a word start; spans are taken in random order while their summed length
    stays within the budget, round(`mask_prob` x the row's maskable tokens) (so a row never has more selected than
    `max_selected(T, mask_prob)`: static shapes downstream); overlapping spans merge. input_ids, word_starts (B, T)
    -> (selected (B, T) bool, span_start (B, T): each selected token's span's first position)."""
    maskable = torch.ones_like(input_ids, dtype=torch.bool)
    for special in set(special_ids):
        maskable &= input_ids != special
    if attention_mask is not None:
        maskable &= attention_mask.bool()
    batch, length = input_ids.shape
    positions = positions_like(input_ids)
    starts = word_starts.bool() & maskable  # the possible span starts
    # units: maskable words, and each token that is not maskable on its own (a span stops covering there)
    boundary = starts | ~maskable
    boundary[:, 0] = True
    unit = boundary.long().cumsum(1) - 1  # (B, T) the unit of each token
    unit_start = torch.full((batch, length + 1), length, device=input_ids.device)
    unit_start.scatter_(1, torch.where(boundary, unit, length), positions)  # first position of each unit, T after
    unit_start[:, length] = length
    uniform = torch.rand(input_ids.shape, generator=generator, device=input_ids.device).clamp(min=1e-12)
    words = (uniform.log() / math.log(1 - geometric_p)).floor().long().add(1).clamp(max=max_span_words)
    end = unit_start.gather(1, (unit + words).clamp(max=length))  # (B, T) where a span starting here would end
    span_length = torch.where(starts, end - positions, 0)
    # spans in random order, kept while the running total of their lengths is within the budget; the first span
    # that does not fit is dropped, and the next round goes on with the spans after it and what is left of the budget
    budget = (maskable.sum(1, keepdim=True) * mask_prob).round().long()
    budget = budget.clamp(min=1, max=max_selected(length, mask_prob))
    order = torch.rand(input_ids.shape, generator=generator, device=input_ids.device).argsort(dim=1)
    kept, dropped = torch.zeros_like(starts), torch.zeros_like(starts)
    for _ in range(ROUNDS):  # a fixed number of rounds: no host sync
        candidates = (starts & ~kept & ~dropped).gather(1, order)
        lengths = torch.where(candidates, span_length.gather(1, order), 0)
        remaining = budget - torch.where(kept, span_length, 0).sum(1, keepdim=True)
        fits = (lengths.cumsum(1) <= remaining) & candidates
        misfits = candidates & ~fits
        first_misfit = misfits & (misfits.long().cumsum(1) == 1)
        kept |= torch.zeros_like(starts).scatter(1, order, fits)
        dropped |= torch.zeros_like(starts).scatter(1, order, first_misfit)
    # coverage: +1 where a kept span starts, -1 where it ends; merged spans take the latest start
    cover = torch.zeros((batch, length + 1), dtype=torch.long, device=input_ids.device)
    cover.scatter_add_(1, torch.where(kept, positions, length), kept.long())
    cover.scatter_add_(1, torch.where(kept, end, length), -kept.long())
    selected = (cover[:, :length].cumsum(1) > 0) & maskable
    span_start = torch.where(kept, positions, -1).cummax(1).values.clamp(min=0)
    return selected, span_start


class SpanMasking(Objective):
    """SpanBERT's objective: `span_mask` selects whole-word spans (15 % budget, geometric lengths); each span as a
    whole becomes [MASK]s, random tokens or stays as it is (`replace_probs`, 80/10/10); the loss is the MLM loss at
    the selected tokens plus, with `boundary_objective`, the span-boundary loss: each selected token predicted from
    the tokens just outside its span and its position in it (`SpanBoundaryHead`). Needs word starts in the batch
    (data.word_starts: true)."""

    name = "span"
    corrupts_tokens = True  # (its loss sums two token losses: the MLM part's perplexity is logged as an extra)

    def __init__(
        self,
        mask_token_id: int | None = None,
        special_ids: Sequence[int] | None = None,
        mask_prob: float = 0.15,
        geometric_p: float = 0.2,
        max_span_words: int = 10,
        replace_probs: tuple[float, float, float] = (0.8, 0.1, 0.1),
        boundary_objective: bool = True,
        weight: float = 1.0,
    ):
        super().__init__(weight)
        if not 0 < geometric_p < 1 or max_span_words < 1 or not 0 < mask_prob < 1:
            raise ConfigError(f"SpanMasking needs 0 < geometric_p < 1, max_span_words >= 1 and 0 < mask_prob < 1; got "
                             f"{geometric_p}, {max_span_words}, {mask_prob}")
        if abs(sum(replace_probs) - 1.0) > 1e-6 or min(replace_probs) < 0:
            raise ConfigError(f"replace_probs (mask, random, keep) must be >= 0 and sum to 1, got {replace_probs}")
        self.mask_token_id = mask_token_id
        self.special_ids = list(special_ids) if special_ids is not None else None
        self.mask_prob, self.geometric_p, self.max_span_words = mask_prob, geometric_p, max_span_words
        self.replace_probs = tuple(replace_probs)
        self.boundary_objective = boundary_objective

    def bind(self, backbone: Transformer, tokens: TokenIds | None = None) -> None:
        self.mask_token_id, self.special_ids = resolve_masking_ids(
            "SpanMasking", self.mask_token_id, self.special_ids, tokens)
        self.vocab_size = replacement_vocab_size(tokens, backbone)
        self.head = LMHead(backbone)
        self.boundary_head = SpanBoundaryHead(backbone) if self.boundary_objective else None

    def heads(self) -> dict[str, nn.Module]:
        return {self.name: self.head} | ({"span_boundary": self.boundary_head} if self.boundary_objective else {})

    def data_requirements(self) -> dict[str, object]:
        return {"layout": "stream", "word_starts": True}

    def output_layer_share(self) -> float:
        return self.mask_prob * (2 if self.boundary_objective else 1)  # MLM and boundary predictions, same tokens

    def corrupt(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        if "word_starts" not in batch:
            raise ConfigError("span masking needs word_starts in the batch; set data.word_starts: true")
        ids = batch["input_ids"]
        selected, span_start = span_mask(
            ids, batch["word_starts"], special_ids=self.special_ids, mask_prob=self.mask_prob,
            geometric_p=self.geometric_p, max_span_words=self.max_span_words, generator=generator,
            attention_mask=batch.get("attention_mask"))
        action = torch.rand(ids.shape, generator=generator, device=ids.device).gather(1, span_start)  # one per span
        random_ids = random_non_special(ids.shape, self.vocab_size, self.special_ids, generator, ids.device)
        corrupted = torch.where(selected & (action < self.replace_probs[0]), self.mask_token_id, ids)
        to_random = selected & (action >= self.replace_probs[0]) & (action < sum(self.replace_probs[:2]))
        corrupted = torch.where(to_random, random_ids, corrupted)
        positions = positions_like(ids)
        # each selected token's boundaries: the nearest unselected tokens on either side (merged spans share them)
        left = torch.where(selected, -1, positions).cummax(1).values.clamp(min=0)
        length = ids.shape[1]
        right = torch.where(selected, length, positions).flip(1).cummin(1).values.flip(1).clamp(max=length - 1)
        return {**batch, "input_ids": corrupted, "span_labels": torch.where(selected, ids, IGNORE_INDEX),
                "span_left": left, "span_right": right, "span_position": positions - left}

    def forward(self, hidden_states: Tensor, batch: Batch) -> ObjectiveOutput:
        labels = batch["span_labels"]
        places = selected_positions(labels, max_selected(labels.shape[1], self.mask_prob))  # (B, k): static
        hidden, flat_labels = gather_at(hidden_states, labels, places)
        loss, correct = label_cross_entropy(self.head(hidden), flat_labels, overwrite_logits=True)
        counted = (flat_labels != IGNORE_INDEX).float()
        extra = {"mlm_perplexity": loss.detach().exp()}
        if self.boundary_head is None:
            return ObjectiveOutput(loss, correct, counted=counted, extra=extra)
        ends = {key: batch[f"span_{key}"].gather(1, places) for key in ("left", "right", "position")}
        (left, _), (right, _) = (gather_at(hidden_states, labels, ends[side]) for side in ("left", "right"))
        boundary_logits = self.boundary_head(hidden_states, left, right, ends["position"].flatten())
        boundary_loss, _ = label_cross_entropy(boundary_logits, flat_labels, overwrite_logits=True)
        return ObjectiveOutput(loss + boundary_loss, correct, counted=counted,
                               extra=extra | {"mlm_loss": loss, "boundary_loss": boundary_loss})
