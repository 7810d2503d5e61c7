"""Sentence order prediction (ALBERT): are two consecutive segments in their original order, or swapped?"""

from __future__ import annotations

import torch
from torch import Tensor

from models.config import ConfigError
from objectives.base import Batch, SegmentPairClassification

IN_ORDER, SWAPPED = 0, 1  # the Hugging Face convention for sentence_order_label


def swap_segments(
    input_ids: Tensor, token_type_ids: Tensor, attention_mask: Tensor, swap: Tensor
) -> tuple[Tensor, Tensor]:
    """Rows laid out [CLS] A [SEP] B [SEP] (padding after) become [CLS] B [SEP] A [SEP] where `swap` (B,) is True,
    with token type 0 on [CLS] B [SEP] and 1 on A [SEP]. Vectorised: one gather. Returns (input_ids, token_type_ids)."""
    source, token_type_ids = swap_order(token_type_ids, attention_mask, swap)
    return input_ids.gather(1, source), token_type_ids


def swap_order(token_type_ids: Tensor, attention_mask: Tensor, swap: Tensor) -> tuple[Tensor, Tensor]:
    """For rows laid out [CLS] A [SEP] B [SEP] (padding after): the position (B, T) each output position takes its
    token from, [CLS] B [SEP] A [SEP] where `swap` (B,) is True and the identity elsewhere, and the token types of
    the output (0 on [CLS] B [SEP], 1 on A [SEP]). Every per-token field moves with `field.gather(1, source)`."""
    batch_size, length = token_type_ids.shape
    real = attention_mask.bool()
    first = ((token_type_ids == 0) & real).sum(1, keepdim=True)  # len([CLS] A [SEP]) (B, 1)
    b_len = real.sum(1, keepdim=True) - first - 1  # len(B)
    a_len = first - 2
    j = torch.arange(length, device=token_type_ids.device).expand(batch_size, length)  # output positions
    source = j  # [CLS], the final [SEP] and padding stay where they are
    source = torch.where((j >= 1) & (j <= b_len), first + j - 1, source)  # B
    source = torch.where(j == b_len + 1, first - 1, source)  # the middle [SEP]
    source = torch.where((j >= b_len + 2) & (j <= b_len + 1 + a_len), j - b_len - 1, source)  # A
    swapped_types = ((j >= b_len + 2) & real).to(token_type_ids.dtype)
    swap = swap[:, None]
    return torch.where(swap, source, j), torch.where(swap, swapped_types, token_type_ids)


# Per-token fields of a batch that describe the token at their position, and so move with it when segments swap
# (attention_mask, position_ids and document_ids describe positions; token types are made anew).
TOKEN_FIELDS = ("input_ids", "word_starts")


class SentenceOrderPrediction(SegmentPairClassification):
    """Binary classification on [CLS]. Its corruption swaps half of the pairs (A, B of consecutive segments of one
    document, from the "pairs" layout) on the device and sets `sentence_order_label`. It moves tokens, so it runs
    before any token-level corruption (`rearranges_tokens`; a batch that already carries per-token labels is
    refused): every label is then made on the tokens as the backbone sees them."""

    name = "sop"
    label_key = "sentence_order_label"
    rearranges_tokens = True

    def __init__(self, swap_prob: float = 0.5, weight: float = 1.0):
        super().__init__(weight)
        self.swap_prob = swap_prob

    def data_requirements(self) -> dict[str, object]:
        return {"layout": "pairs", "pair_task": "sop"}  # consecutive segments, swapped here

    def corrupt(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        labelled = sorted(key for key in batch if key.endswith("_labels") and batch[key].dim() == 2)
        if labelled:
            raise ConfigError(f"sentence order prediction swaps segments, but the batch already has per-token labels "
                             f"({', '.join(labelled)}) that would stay behind: corrupt with objectives.base."
                             "corrupt_batch, which swaps first")
        ids = batch["input_ids"]
        swap = torch.rand(ids.shape[0], generator=generator, device=ids.device) < self.swap_prob
        source, token_type_ids = swap_order(batch["token_type_ids"], batch["attention_mask"], swap)
        moved = {key: batch[key].gather(1, source) for key in TOKEN_FIELDS if key in batch}
        return {**batch, **moved, "token_type_ids": token_type_ids, "sentence_order_label": swap.long()}
