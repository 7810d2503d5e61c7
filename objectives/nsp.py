"""Next sentence prediction (BERT): is segment B the real continuation of segment A, or from another document?"""

from __future__ import annotations

from objectives.base import SegmentPairClassification

IS_NEXT, NOT_NEXT = 0, 1  # the Hugging Face convention for next_sentence_label


class NextSentencePrediction(SegmentPairClassification):
    """Binary classification on [CLS]; the pairs and `next_sentence_label` (B,) come from the data module's "pairs"
    layout (`pretrain.data.pairs.build_pairs`: half of the B segments from another document)."""

    name = "nsp"
    label_key = "next_sentence_label"

    def data_requirements(self) -> dict[str, object]:
        return {"layout": "pairs", "pair_task": "nsp"}  # pairs with negatives from other documents
