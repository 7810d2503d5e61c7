"""Causal language modelling (GPT): predict each next token; padding and document boundaries carry no loss."""

from __future__ import annotations

import torch

from models import LMHead, Transformer
from objectives.base import Batch, Objective, ObjectiveOutput, label_cross_entropy
from objectives.masking import IGNORE_INDEX


def next_token_labels(batch: Batch) -> torch.Tensor:
    """Labels (B, T-1) for positions 0..T-2: the next token, or -100 where it is padding or another document's."""
    labels = batch["input_ids"][:, 1:]
    if "attention_mask" in batch:  # masked_fill, not boolean indexing: no host sync in the training step
        labels = labels.masked_fill(batch["attention_mask"][:, 1:] == 0, IGNORE_INDEX)
    if "document_ids" in batch:
        documents = batch["document_ids"]
        labels = labels.masked_fill(documents[:, 1:] != documents[:, :-1], IGNORE_INDEX)
    return labels


class CausalLM(Objective):
    """GPT's objective, with GPT-2's output layer: the tied embedding matrix, no transform, no bias."""

    name = "clm"
    attention = "causal"
    language_model = True

    def make_head(self, backbone: Transformer) -> LMHead:
        return LMHead(backbone, transform=False, bias=False)

    def output_layer_share(self) -> float:
        return 1.0  # every position predicts the next token

    def forward(self, hidden_states: torch.Tensor, batch: Batch) -> ObjectiveOutput:
        labels = next_token_labels(batch).flatten()  # (B * (T-1),)
        logits = self.head(hidden_states[:, :-1]).flatten(0, 1)  # (B * (T-1), V)
        loss, correct = label_cross_entropy(logits, labels, overwrite_logits=True)  # nothing else reads them
        return ObjectiveOutput(loss, correct, counted=(labels != IGNORE_INDEX).float())
