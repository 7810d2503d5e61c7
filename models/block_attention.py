"""Attention without a (T x T) mask: `backbone.attention_masks: blocks`.

The dense path (`attention_mask_for`, `local_mask` in models/transformer.py) builds one boolean (B, 1, T, T) mask
per forward, and a second one for local layers: at T = 8,192 that is 64 MB per batch row each, and a mask keeps
SDPA off its fastest kernels. Here nothing quadratic in T is built:

- **global layers** (documents, padding, causal): the tokens of each document (padding: a group of its own) are
  gathered into rows of their own, rows of similar length together (widths by powers of two, so the padding
  wasted is under half), and each group of rows goes through SDPA with at most a key-padding mask (B', 1, 1, W)
  or `is_causal`: the variable-length attention of ModernBERT's unpadding, with only PyTorch operations;
- **local layers** (a window of w tokens): queries in chunks of C, each against the C + w keys around it
  (`Tensor.unfold`, a view), the element mask (window, document, padding, causal) built per chunk: O(T (C + w)).

Both give the dense path's outputs at every real (not padding) position (tests/models/test_block_attention.py, fp32
1e-5) and run on any device with autograd (PyTorch 2.13's FlexAttention has no backward on CPU). With a KV cache
(generation: few queries against many keys) the dense masks are used: they are (T_new x T) there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def token_groups(attention_mask: Tensor | None, document_ids: Tensor | None, batch: int, length: int,
                 device: torch.device) -> Tensor | None:
    """(B, T) integer group of each token: tokens attend only within their group (their document, in their batch
    row; padding tokens form one group per row of their own). None: one group per row, no padding."""
    if attention_mask is None and document_ids is None:
        return None
    if document_ids is None:
        groups = torch.ones(batch, length, dtype=torch.long, device=device)
    else:  # >= 1 in each row (no host sync: the row's smallest id, not the batch's largest, is read)
        ids = document_ids.long()
        groups = ids - ids.min(dim=1, keepdim=True).values + 1
    if attention_mask is not None:
        groups = groups.masked_fill(attention_mask == 0, 0)  # padding: group 0 of its row
    return groups + torch.arange(batch, device=device)[:, None] * 2**40  # distinct per row (ids span < 2^40)


class GroupedRows:
    """The layout that puts each group's tokens into a row of its own: computed once per forward (from the groups)
    and used by every global layer. Rows are bucketed by width (powers of two up to T); within a row the tokens
    keep their order, so `is_causal` is causal attention within the group."""

    def __init__(self, groups: Tensor):
        B, T = groups.shape
        flat = groups.reshape(-1)
        order = torch.sort(flat, stable=True).indices  # tokens of one group together, in position order
        _, counts = torch.unique_consecutive(flat[order], return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        widths = torch.clamp(2 ** torch.ceil(torch.log2(counts.double())).long(), max=T)
        self.buckets: list[tuple[Tensor, Tensor | None]] = []  # per width: (token index (n, W), key padding or None)
        slot = torch.empty(B * T, dtype=torch.long, device=groups.device)  # each token's place in the outputs
        placed = 0
        for width in torch.unique(widths).tolist():
            chosen = (widths == width).nonzero().squeeze(1)
            n = chosen.numel()
            offsets = torch.arange(width, device=groups.device)
            real = offsets[None, :] < counts[chosen][:, None]  # (n, W)
            index = order[(starts[chosen][:, None] + offsets[None, :]).clamp(max=B * T - 1)]  # (n, W)
            index = torch.where(real, index, 0)  # padding slots read token 0 (masked as a key, output dropped)
            slot[index[real]] = placed + torch.arange(n * width, device=groups.device).view(n, width)[real]
            placed += n * width
            self.buckets.append((index, None if bool(real.all()) else real))
        self.slot = slot

    def attend(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, dropout: float, gqa: bool) -> Tensor:
        """q (B, N, T, D), k and v (B, KV, T, D) -> (B, N, T, D): attention within each group."""
        B, N, T, D = q.shape
        q, k, v = (t.transpose(1, 2).reshape(B * T, t.shape[1], D) for t in (q, k, v))  # (B T, heads, D)
        outputs = []
        for index, real in self.buckets:
            rows = [t[index].transpose(1, 2) for t in (q, k, v)]  # (n, heads, W, D)
            # causal rows are right-padded: is_causal alone keeps real queries off the padding slots
            mask = None if real is None or causal else real[:, None, None, :]
            y = F.scaled_dot_product_attention(*rows, attn_mask=mask, is_causal=causal, dropout_p=dropout,
                                               enable_gqa=gqa)
            outputs.append(y.transpose(1, 2).reshape(-1, N, D))  # (n W, N, D)
        y = torch.cat(outputs)[self.slot]  # (B T, N, D)
        return y.view(B, T, N, D).transpose(1, 2)


@dataclass
class Band:
    """A local layer's attention: a window of `window` tokens within each token's group (`token_groups`)."""

    groups: Tensor | None
    window: int
    causal: bool


def local_attention(q: Tensor, k: Tensor, v: Tensor, groups: Tensor | None, window: int, causal: bool,
                    dropout: float, chunk: int | None = None) -> Tensor:
    """Banded attention, exactly `local_mask`'s: query i keeps keys j with |i - j| <= window // 2 (causal:
    0 <= i - j < window) in its group, and itself. q (B, N, T, D), k and v (B, KV, T, D) -> (B, N, T, D);
    memory O(T (chunk + window)) instead of O(T^2)."""
    B, N, T, D = q.shape
    if k.shape[1] != N:  # grouped-query attention: each key/value head serves N / KV query heads
        k, v = (t.repeat_interleave(N // t.shape[1], dim=1) for t in (k, v))
    left, right = (window - 1, 0) if causal else (window // 2, window // 2)
    C = chunk or max(16, min(T, 2 ** math.ceil(math.log2(max(left, right, 1)))))
    n = math.ceil(T / C)
    pad = n * C - T
    width = C + left + right
    qc = F.pad(q, (0, 0, 0, pad)).view(B, N, n, C, D)
    kw, vw = (F.pad(t, (0, 0, left, right + pad)).unfold(2, width, C) for t in (k, v))  # (B, N, n, D, width)
    scores = torch.matmul(qc, kw) * D ** -0.5  # (B, N, n, C, width)
    query = torch.arange(n * C, device=q.device).view(n, C, 1)
    key = torch.arange(n, device=q.device).view(n, 1, 1) * C - left + torch.arange(width, device=q.device)
    distance = query - key  # (n, C, width)
    keep = (distance >= 0) & (distance < window) if causal else distance.abs() <= window // 2
    keep = keep & (key >= 0) & (key < T)
    if groups is not None:  # the key in the query's group (outside the sequence: -1, no group's)
        query_group = F.pad(groups, (0, pad), value=-1).view(B, n, C, 1)
        key_group = F.pad(groups, (left, right + pad), value=-1).unfold(1, width, C)  # (B, n, width)
        keep = keep & (query_group == key_group[:, :, None, :])  # (B, n, C, width)
    keep = keep | (distance == 0)  # every query keeps itself (as the dense mask: no row without a key)
    keep = keep.unsqueeze(-4)  # (B or 1, 1, n, C, width)
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
    if dropout:
        probs = F.dropout(probs, dropout)
    y = torch.matmul(probs, vw.transpose(-1, -2))  # (B, N, n, C, D)
    return y.reshape(B, N, n * C, D)[:, :, :T]
