"""attention_masks: blocks (models/block_attention.py) against the dense masks, the reference: every combination
of bidirectional/causal x documents x padding x local window x grouped-query heads gives the same outputs at every
real token and the same gradients (fp32, 1e-5), and nothing (T x T) is made."""

import dataclasses
import itertools

import pytest
import torch

from models import Transformer, TransformerConfig
from models.block_attention import GroupedRows, local_attention, token_groups


def tiny(**overrides) -> TransformerConfig:
    return TransformerConfig(vocab_size=50, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=48,
                             max_position_embeddings=96, dropout=0.0, attention_dropout=0.0, **overrides)


def batch(T: int = 70, documents: bool = True, padding: bool = True, seed: int = 0) -> dict:
    """Two rows: packed documents of uneven lengths (one of a single token), and padding at the end (row 1) and,
    causal generation style, at the start (row 0)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": torch.randint(0, 50, (2, T), generator=generator)}
    if documents:
        inputs["document_ids"] = torch.tensor([[0] * 20 + [1] * 1 + [2] * (T - 21),
                                               [5] * 33 + [6] * (T - 33)])
    if padding:
        mask = torch.ones(2, T, dtype=torch.long)
        mask[1, T - 9:] = 0
        mask[0, :3] = 0
        inputs["attention_mask"] = mask
    return inputs


CASES = list(itertools.product([False, True], [False, True], [False, True], [None, 8, 17], [4, 2]))


@pytest.mark.parametrize(("causal", "documents", "padding", "window", "kv_heads"), CASES)
def test_blocks_equal_the_dense_masks_outputs_and_gradients(causal, documents, padding, window, kv_heads):
    config = tiny(causal=causal, local_attention_window=window, global_attention_every=3 if window else 1,
                  num_kv_heads=kv_heads, position_embedding="rotary" if window else "learned")
    torch.manual_seed(0)
    dense = Transformer(config)
    blocks = Transformer(dataclasses.replace(config, attention_masks="blocks"))
    blocks.load_state_dict(dense.state_dict())
    inputs = batch(documents=documents, padding=padding)
    real = inputs.get("attention_mask", torch.ones(2, 70)).bool()
    outputs = [model(**inputs) for model in (dense, blocks)]
    torch.testing.assert_close(outputs[1][real], outputs[0][real], rtol=1e-5, atol=1e-5)
    weights = torch.randn(outputs[0][real].shape, generator=torch.Generator().manual_seed(1))
    for y in outputs:
        (y[real] * weights).sum().backward()  # a random direction (a sum of squares of a LayerNorm's output is flat)
    for (name, a), b in zip(dense.named_parameters(), blocks.parameters(), strict=True):
        # 1e-5 of the gradient's scale (summed over 140 tokens, an element's rounding is the sum's)
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-5 * float(a.grad.abs().max()), msg=name)


def test_blocks_hold_no_square_mask_and_every_group_row_is_as_short_as_it_can_be():
    """The global layers' rows: one per document (padding: its own), each as wide as the next power of two of its
    length; the local layers' chunks: (chunk + window) keys per query."""
    inputs = batch(T=70)
    groups = token_groups(inputs["attention_mask"], inputs["document_ids"], 2, 70, torch.device("cpu"))
    rows = GroupedRows(groups)
    widths = sorted((index.shape[1], index.shape[0]) for index, _ in rows.buckets)
    # row 0: pads 3, docs 17 (20 - 3 pads), 1, 49; row 1: docs 33, 28 (37 - 9 pads), pads 9
    assert widths == [(1, 1), (4, 1), (16, 1), (32, 2), (64, 2)]
    assert sum(index.numel() for index, _ in rows.buckets) < 2 * 2 * 70
    assert rows.slot.unique().numel() == 140  # every token has its own output slot


def test_local_attention_costs_memory_linear_in_the_length():
    """Scores kept for backward: (T / C) chunks x C x (C + window) per head, not T x T."""
    q = torch.randn(1, 1, 4096, 8)
    window = 32
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        saved: list[int] = []
        local_attention(q.requires_grad_(), q, q, None, window, causal=False, dropout=0.0)
    assert max(saved) < 4096 * 4 * window  # dense scores would be 4096 ** 2 = 16.8 M
    assert max(saved) >= 4096 * window


def test_blocks_with_a_kv_cache_use_the_dense_masks():
    """Generation (a KV cache) with attention_masks: blocks gives what a full forward gives."""
    config = tiny(causal=True, local_attention_window=8, global_attention_every=3, position_embedding="rotary",
                  attention_masks="blocks")
    torch.manual_seed(0)
    model = Transformer(config).eval()
    ids = torch.randint(0, 50, (2, 30))
    full = model(ids)
    cache = model.new_cache()
    first = model(ids[:, :20], cache=cache)
    rest = torch.cat([model(ids[:, i:i + 1], cache=cache) for i in range(20, 30)], dim=1)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, rtol=1e-5, atol=1e-5)
