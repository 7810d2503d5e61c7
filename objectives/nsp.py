"""Next sentence prediction (BERT): is segment B the real continuation of segment A, or from another document?"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models import Transformer, make_head
from objectives.base import Batch, Objective, ObjectiveOutput, TokenIds, accuracy_of

IS_NEXT, NOT_NEXT = 0, 1  # the Hugging Face convention for next_sentence_label


class NextSentencePrediction(Objective):
    """Binary classification on [CLS]; the pairs and `next_sentence_label` (B,) come from the data module's "pairs"
    layout (`pretrain.data.pairs.build_pairs`: half of the B segments from another document)."""

    name = "nsp"
    pair_task = True

    def bind(self, backbone: Transformer, tokens: TokenIds | None = None) -> None:
        self.head = make_head(self.name, backbone.config, backbone)

    def data_requirements(self) -> dict[str, object]:
        return {"layout": "pairs", "pair_task": "nsp"}  # pairs with negatives from other documents

    def forward(self, hidden_states: torch.Tensor, batch: Batch) -> ObjectiveOutput:
        logits = self.head(hidden_states)  # (B, 2)
        labels = batch["next_sentence_label"]
        return ObjectiveOutput(F.cross_entropy(logits.float(), labels), accuracy_of(logits, labels))
