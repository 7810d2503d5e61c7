"""BERT-style token masking, vectorised on the batch's device, shared by MLM and ELECTRA's generator."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from models.config import ConfigError

IGNORE_INDEX = -100  # labels at positions that carry no loss (the Hugging Face convention)


def max_selected(length: int, mask_prob: float, num_masked: int | None = None) -> int:
    """The most tokens `mask_tokens` selects in a row of `length` (without whole-word masking): the static size of
    the gathered predictions (`selected_positions`, `gather_at`)."""
    if num_masked is not None:
        return max(0, min(num_masked, length))
    return min(length, max(1, math.ceil(mask_prob * length)))


def mask_tokens(
    input_ids: Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_ids: Sequence[int],
    mask_prob: float = 0.15,
    generator: torch.Generator | None = None,
    replace_probs: tuple[float, float, float] = (0.8, 0.1, 0.1),
    word_starts: Tensor | None = None,
    num_masked: int | None = None,
    attention_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Select tokens to predict and corrupt them. input_ids (B, T) -> (corrupted_ids (B, T), labels (B, T)).

    Special tokens (and padding: pass its id in `special_ids`, or an `attention_mask`) are never selected. Each row
    has round(`mask_prob` x its maskable tokens) selected (at least 1), uniformly without replacement: the rule of
    Google's BERT (create_pretraining_data.py) and ELECTRA; with `num_masked`, that many per row instead (fewer only
    where a row has fewer maskable tokens). Either way a row never has more than `max_selected(T, ...)`, so the
    output layer's input has a static shape and nothing waits for the device. With `word_starts` (B, T), True at each
    word's first sub-token, whole words are selected instead, each with probability `mask_prob`. Of the selected
    tokens, the fractions `replace_probs` = (mask, random, keep) become [MASK], a random non-special token, or stay as
    they are. labels hold the original ids at selected positions and -100 elsewhere.
    """
    if abs(sum(replace_probs) - 1.0) > 1e-6 or min(replace_probs) < 0:
        raise ConfigError(f"replace_probs (mask, random, keep) must be >= 0 and sum to 1, got {replace_probs}")
    if not 0.0 < mask_prob < 1.0:
        raise ConfigError(f"mask_prob must be in (0, 1), got {mask_prob}")
    if word_starts is not None and num_masked is not None:
        raise ConfigError("whole-word masking (word_starts) and a fixed num_masked per row cannot be combined")
    maskable = torch.ones_like(input_ids, dtype=torch.bool)
    for special in set(special_ids):  # comparisons with Python ints: no tensor built and copied each step
        maskable &= input_ids != special
    if attention_mask is not None:
        maskable &= attention_mask.bool()

    scores = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    if word_starts is not None:
        starts = word_starts.bool() & maskable
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        word_start_of = torch.cummax(torch.where(starts, positions, 0), dim=1).values  # (B, T) its word's start
        selected = (starts & (scores < mask_prob)).gather(1, word_start_of) & maskable
    else:
        available = maskable.sum(dim=1, keepdim=True)  # (B, 1)
        count = available if num_masked is not None else (available * mask_prob).round().long().clamp(min=1)
        limit = max_selected(input_ids.shape[1], mask_prob, num_masked)
        count = count.clamp(max=limit).minimum(available)
        order = scores.masked_fill(~maskable, 2.0).argsort(dim=1)  # maskable tokens first, in random order
        rank = torch.empty_like(order).scatter_(1, order, positions_like(order))  # each token's place in the order
        selected = rank < count

    action = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    to_mask = selected & (action < replace_probs[0])
    to_random = selected & (action >= replace_probs[0]) & (action < replace_probs[0] + replace_probs[1])
    random_ids = random_non_special(input_ids.shape, vocab_size, special_ids, generator, input_ids.device)
    corrupted = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    corrupted = torch.where(to_random, random_ids, corrupted)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return corrupted, labels


def positions_like(tensor: Tensor) -> Tensor:
    """0, 1, ..., T-1 along the last dimension, in `tensor`'s shape, dtype and device."""
    return torch.arange(tensor.shape[-1], device=tensor.device, dtype=tensor.dtype).expand_as(tensor)


def random_non_special(
    shape: torch.Size, vocab_size: int, special_ids: Sequence[int], generator: torch.Generator | None,
    device: torch.device,
) -> Tensor:
    """Uniform token ids in [0, vocab_size) that are never in `special_ids`, without a host sync."""
    excluded = sorted({s for s in special_ids if 0 <= s < vocab_size})
    ids = torch.randint(0, vocab_size - len(excluded), shape, generator=generator, device=device)
    for special in excluded:  # shift past each excluded id, in ascending order
        ids = ids + (ids >= special).long()
    return ids


def selected_positions(labels: Tensor, num_selected: int) -> Tensor:
    """(B, k) distinct positions per row covering every selected one (labels != -100), when no row has more than k."""
    return (labels != IGNORE_INDEX).float().topk(num_selected, dim=1, sorted=False).indices


def gather_selected(hidden_states: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Hidden states and labels at the selected positions only, so the V-wide output layer runs there alone, for a
    varying count per row (whole-word masking): boolean indexing, which waits for the device. (With a static count,
    `gather_at(hidden_states, labels, selected_positions(labels, k))` does not.)
    hidden_states (B, T, H), labels (B, T) with -100 where not selected -> (N, H), (N,)"""
    selected = labels != IGNORE_INDEX
    return hidden_states[selected], labels[selected]


def gather_at(hidden_states: Tensor, labels: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """hidden_states (B, T, H) and labels (B, T) at `positions` (B, k) -> (B * k, H), (B * k,)."""
    hidden = hidden_states.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden_states.shape[-1]))
    return hidden.flatten(0, 1), labels.gather(1, positions).flatten()
