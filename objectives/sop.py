"""Sentence order prediction (ALBERT): are two consecutive segments in their original order, or swapped?"""

from __future__ import annotations

import torch
from torch import Tensor

from objectives.base import Batch, SegmentPairClassification

IN_ORDER, SWAPPED = 0, 1  # the Hugging Face convention for sentence_order_label


def swap_segments(
    input_ids: Tensor, token_type_ids: Tensor, attention_mask: Tensor, swap: Tensor
) -> tuple[Tensor, Tensor]:
    """Rows laid out [CLS] A [SEP] B [SEP] (padding after) become [CLS] B [SEP] A [SEP] where `swap` (B,) is True,
    with token type 0 on [CLS] B [SEP] and 1 on A [SEP]. Vectorised: one gather. Returns (input_ids, token_type_ids)."""
    batch_size, length = input_ids.shape
    real = attention_mask.bool()
    first = ((token_type_ids == 0) & real).sum(1, keepdim=True)  # len([CLS] A [SEP]) (B, 1)
    b_len = real.sum(1, keepdim=True) - first - 1  # len(B)
    a_len = first - 2
    j = torch.arange(length, device=input_ids.device).expand(batch_size, length)  # output positions
    source = j  # [CLS], the final [SEP] and padding stay where they are
    source = torch.where((j >= 1) & (j <= b_len), first + j - 1, source)  # B
    source = torch.where(j == b_len + 1, first - 1, source)  # the middle [SEP]
    source = torch.where((j >= b_len + 2) & (j <= b_len + 1 + a_len), j - b_len - 1, source)  # A
    swapped_types = ((j >= b_len + 2) & real).to(token_type_ids.dtype)
    swap = swap[:, None]
    return (torch.where(swap, input_ids.gather(1, source), input_ids),
            torch.where(swap, swapped_types, token_type_ids))


class SentenceOrderPrediction(SegmentPairClassification):
    """Binary classification on [CLS]. Its corruption swaps half of the pairs (A, B of consecutive segments of one
    document, from the "pairs" layout) on the device and sets `sentence_order_label`."""

    name = "sop"
    label_key = "sentence_order_label"

    def __init__(self, swap_prob: float = 0.5, weight: float = 1.0):
        super().__init__(weight)
        self.swap_prob = swap_prob

    def data_requirements(self) -> dict[str, object]:
        return {"layout": "pairs", "pair_task": "sop"}  # consecutive segments, swapped here

    def corrupt(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        ids = batch["input_ids"]
        swap = torch.rand(ids.shape[0], generator=generator, device=ids.device) < self.swap_prob
        input_ids, token_type_ids = swap_segments(ids, batch["token_type_ids"], batch["attention_mask"], swap)
        return {**batch, "input_ids": input_ids, "token_type_ids": token_type_ids,
                "sentence_order_label": swap.long()}
