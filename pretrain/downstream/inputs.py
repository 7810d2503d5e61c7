"""Token rows as model inputs: right padding, GPT-1's input transformation for causal models, task batches, and a
task head's forward on them (shared by prediction and fine-tuning)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models import LMHead, SequenceHead, Transformer

Row = tuple[list[int], list[int]]  # token ids and segment ids of one input


def right_pad(rows: list[list[int]], value: int) -> Tensor:
    """Rows of different lengths as one (B, T_max) tensor, padded on the right with `value`."""
    width = max(len(row) for row in rows)
    return torch.tensor([list(row) + [value] * (width - len(row)) for row in rows], dtype=torch.long)


def pad_pairs(rows: list[Row], pad_id: int) -> dict[str, Tensor]:
    """(ids, segment ids) rows as input_ids, token_type_ids and attention_mask (B, T_max)."""
    return {"input_ids": right_pad([ids for ids, _ in rows], pad_id),
            "token_type_ids": right_pad([types for _, types in rows], 0),
            "attention_mask": right_pad([[1] * len(ids) for ids, _ in rows], 0)}


def task_batch(examples: list[list[Row]], pad_id: int) -> dict[str, Tensor]:
    """Examples of one input each, or of two (a symmetric pair in both orders: the second order's tensors are
    `swapped_input_ids`, ...), as one padded batch."""
    batch = pad_pairs([inputs[0] for inputs in examples], pad_id)
    if len(examples[0]) == 2:
        batch |= {f"swapped_{key}": value for key, value in pad_pairs([inputs[1] for inputs in examples],
                                                                       pad_id).items()}
    return batch


def truncate_pair(first: list[int], second: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Cut the longer of two token lists first until both fit `budget` tokens together."""
    if len(first) + len(second) <= budget:
        return first, second
    short = min(len(first), len(second), budget // 2)
    if len(first) <= len(second):
        return first[:short], second[:budget - short]
    return first[:budget - short], second[:short]


def gpt_inputs(first: list[int], second: list[int] | None, tokens: dict[str, int], max_length: int,
               symmetric: bool = False) -> list[Row]:
    """GPT-1's input transformation: `start A extract`, or `start A delim B extract` with segment 0 up to the
    delimiter and 1 after it; both orders (`start B delim A extract` second) for a symmetric pair task. The texts are
    cut (the longer first) so that each input has at most `max_length` tokens."""
    start, delim, extract = tokens["start"], tokens["delim"], tokens["extract"]
    if second is None:
        ids = [start, *first[:max_length - 2], extract]
        return [(ids, [0] * len(ids))]
    first, second = truncate_pair(first, second, max_length - 3)
    orders = [(first, second), (second, first)] if symmetric else [(first, second)]
    return [([start, *a, delim, *b, extract], [0] * (len(a) + 2) + [1] * (len(b) + 1)) for a, b in orders]


def next_token_loss(lm_head: LMHead, hidden_states: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean cross-entropy of each real token given the ones before it (the LM head only at those positions).
    hidden_states (B, T, H), input_ids and attention_mask (B, T) -> ()"""
    scored = attention_mask[:, 1:].bool()  # position t predicts token t + 1, where that is a real token
    logits = lm_head(hidden_states[:, :-1][scored])  # (N, V)
    return nn.functional.cross_entropy(logits.float(), input_ids[:, 1:][scored])


def task_output(backbone: Transformer, head: SequenceHead, batch: dict[str, Tensor], regression: bool,
                lm_head: LMHead | None = None) -> tuple[Tensor, Tensor | None]:
    """The head's output, logits (B, labels) or values (B,) for regression, and with `lm_head` the next-token loss
    over the same inputs (GPT-1's auxiliary LM loss; None without). An encoder's head reads [CLS], a causal model's
    each row's last real token. A batch holding the swapped order of symmetric pairs adds the two orders' vectors
    before the classifier (GPT-1's similarity tasks)."""
    features, lm_losses = None, []
    for prefix in ("", "swapped_") if "swapped_input_ids" in batch else ("",):
        input_ids, attention_mask = batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"]
        types = batch[f"{prefix}token_type_ids"] if backbone.config.type_vocab_size else None
        hidden_states = backbone(input_ids, attention_mask=attention_mask, token_type_ids=types)
        pooled = head.pool(hidden_states, attention_mask)
        features = pooled if features is None else features + pooled
        if lm_head is not None:
            lm_losses.append(next_token_loss(lm_head, hidden_states, input_ids, attention_mask))
    output = head.classify(features)
    return output.squeeze(-1) if regression else output, (sum(lm_losses) / len(lm_losses) if lm_losses else None)
