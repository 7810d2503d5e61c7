"""Next sentence prediction (BERT): is segment B the real continuation of segment A, or from another document?"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from models import ClassificationHead, Transformer
from objectives.base import Batch, Objective, ObjectiveOutput, accuracy_of

IS_NEXT, NOT_NEXT = 0, 1  # the Hugging Face convention for next_sentence_label


def make_nsp_pairs(
    documents: Sequence[Sequence[Sequence[int]]], rng: random.Random, random_next_prob: float = 0.5
) -> list[tuple[list[int], list[int], int]]:
    """(A, B, label) for every two consecutive segments of each document (documents are lists of segments, each a
    list of token ids). With probability `random_next_prob`, B is replaced by a segment of another document and the
    label is NOT_NEXT; otherwise B is the real next segment and the label IS_NEXT."""
    if sum(1 for d in documents if d) < 2:
        raise ValueError("next sentence prediction needs at least two non-empty documents for its negatives")
    non_empty = [i for i, d in enumerate(documents) if d]
    pairs = []
    for index, segments in enumerate(documents):
        for first, second in zip(segments, segments[1:], strict=False):
            if rng.random() < random_next_prob:
                other = index
                while other == index:
                    other = rng.choice(non_empty)
                pairs.append((list(first), list(rng.choice(documents[other])), NOT_NEXT))
            else:
                pairs.append((list(first), list(second), IS_NEXT))
    return pairs


class NextSentencePrediction(Objective):
    """Binary classification on [CLS]; the pairs and `next_sentence_label` (B,) come from the data ("pairs")."""

    name = "nsp"
    pair_task = True

    def bind(self, backbone: Transformer) -> None:
        self.head = ClassificationHead(backbone.config, num_labels=2)

    def forward(self, hidden_states: torch.Tensor, batch: Batch) -> ObjectiveOutput:
        logits = self.head(hidden_states)  # (B, 2)
        labels = batch["next_sentence_label"]
        return ObjectiveOutput(F.cross_entropy(logits.float(), labels), accuracy_of(logits, labels))
