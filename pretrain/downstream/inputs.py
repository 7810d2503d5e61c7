"""Token rows as model inputs: right padding, sentence-pair batches, and a task head's forward on them (shared by
prediction and fine-tuning)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models import Transformer


def right_pad(rows: list[list[int]], value: int) -> Tensor:
    """Rows of different lengths as one (B, T_max) tensor, padded on the right with `value`."""
    width = max(len(row) for row in rows)
    return torch.tensor([list(row) + [value] * (width - len(row)) for row in rows], dtype=torch.long)


def pad_pairs(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Tensor]:
    """(ids, segment ids) rows as input_ids, token_type_ids and attention_mask (B, T_max)."""
    return {"input_ids": right_pad([ids for ids, _ in rows], pad_id),
            "token_type_ids": right_pad([types for _, types in rows], 0),
            "attention_mask": right_pad([[1] * len(ids) for ids, _ in rows], 0)}


def task_output(backbone: Transformer, head: nn.Module, batch: dict[str, Tensor], regression: bool) -> Tensor:
    """A task head on [CLS]: logits (B, labels), or (B,) values for regression."""
    types = batch["token_type_ids"] if backbone.config.type_vocab_size else None
    logits = head(backbone(batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=types))
    return logits.squeeze(-1) if regression else logits
