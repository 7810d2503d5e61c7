"""The contract every objective follows, and the check that a set of objectives can train together.

A batch is a dict of tensors, all (B, T) unless noted: `input_ids`, `attention_mask` (1 = real token),
optionally `token_type_ids`, `position_ids`, `document_ids` (packed "stream" layout), `word_starts`
(whole-word masking), `next_sentence_label` (B,) for NSP ("pairs" layout).

One training step: each objective may `corrupt` the batch (returning a new dict; never in place; `corrupt_batch`
runs those that move tokens first), the backbone runs once on the corrupted batch, then each objective computes its
loss from the shared hidden states.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import ClassificationHead, Head, Transformer, TransformerConfig
from models.config import ConfigError

Batch = dict[str, Tensor]
Layout = Literal["stream", "pairs"]
BACKBONE_INPUTS = ("attention_mask", "token_type_ids", "position_ids", "document_ids")


def backbone_inputs(batch: Batch) -> dict[str, Tensor]:
    """The batch's optional inputs of `Transformer.forward` (all but input_ids)."""
    return {key: batch[key] for key in BACKBONE_INPUTS if key in batch}


@dataclass(frozen=True)
class TokenIds:
    """The tokenizer's ids that corrupting objectives need: [MASK], every special token (padding included), and
    the size of its vocabulary (random replacements draw from it; the model's may be larger, e.g. rounded up)."""

    mask: int | None
    special: list[int]
    vocab_size: int | None = None


def resolve_masking_ids(name: str, mask_token_id: int | None, special_ids: Sequence[int] | None,
                        tokens: TokenIds | None) -> tuple[int, list[int]]:
    """Ids given to the objective win; otherwise the tokenizer's; an error naming the fix if neither has them."""
    mask = mask_token_id if mask_token_id is not None else (tokens.mask if tokens else None)
    special = list(special_ids) if special_ids is not None else (list(tokens.special) if tokens else None)
    if mask is None or special is None:
        raise ConfigError(f"{name} needs mask_token_id and special_ids: give them to the objective, or give the "
                         "training module a tokenizer that has a [MASK] (or <mask>) token")
    return mask, special


def replacement_vocab_size(tokens: TokenIds | None, backbone: Transformer) -> int:
    """How many ids random replacements draw from: the tokenizer's (the model's vocabulary may be larger, e.g.
    rounded up), or the model's when there is no tokenizer."""
    return tokens.vocab_size if tokens is not None and tokens.vocab_size else backbone.config.vocab_size


@dataclass
class ObjectiveOutput:
    """An objective's unweighted loss and what its accuracy is computed from (no host sync: tensors only)."""

    loss: Tensor  # scalar
    correct: Tensor  # (N,) 1.0 where the prediction was right
    counted: Tensor | None = None  # (N,) 1.0 for the predictions that count (None: all of them)
    extra: dict[str, Tensor] = field(default_factory=dict)  # further scalars to log, e.g. sub-losses


class Objective(nn.Module):
    """Owns its corruption, its head(s) and its loss, and says what it needs from the data and how much of the
    vocabulary-wide output layer it runs. Subclasses set the class attributes and define `make_head(backbone)` (or
    `bind`, for more than one head or for the tokenizer's ids) and `forward(hidden_states, batch) -> ObjectiveOutput`.
    Heads are `models.heads.Head`s (an objective's own head class may live in its file): a saved model records them
    and `pretrain.load` rebuilds them.
    """

    name: ClassVar[str]
    attention: ClassVar[Literal["causal", "bidirectional"]] = "bidirectional"
    corrupts_tokens: ClassVar[bool] = False  # rewrites input_ids (MLM, RTD): at most one such objective
    # moves tokens to other positions (SOP's swap): runs before any token-level corruption (see `corrupt_batch`)
    rearranges_tokens: ClassVar[bool] = False
    pair_task: ClassVar[bool] = False  # classifies segment pairs (NSP, SOP): needs the "pairs" layout
    language_model: ClassVar[bool] = False  # its loss is a token cross-entropy: perplexity is logged too

    def __init__(self, weight: float = 1.0):
        super().__init__()
        if weight <= 0:
            raise ConfigError(f"{type(self).__name__}: weight must be positive, got {weight}")
        self.weight = weight

    def bind(self, backbone: Transformer, tokens: TokenIds | None = None) -> None:
        """Build the head(s) once the backbone exists; `tokens`: the tokenizer's ids, for objectives that corrupt."""
        self.head = self.make_head(backbone)

    def make_head(self, backbone: Transformer) -> Head:
        raise NotImplementedError(f"{type(self).__name__} defines make_head(backbone) or bind(backbone, tokens)")

    def heads(self) -> dict[str, nn.Module]:
        """The heads to save with the backbone, by name (one per objective by default: its name)."""
        return {self.name: self.head}

    def output_layer_share(self) -> float:
        """The share of token positions at which this objective runs a vocabulary-wide output layer (counted in the
        model's FLOPs per token, hence in MFU): 0 by default."""
        return 0.0

    def corrupt(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        """The batch this objective wants the backbone to see. The default leaves it unchanged."""
        return batch

    def data_requirements(self) -> dict[str, object]:
        """The data settings this objective needs, by the name of the data module's argument (e.g. NSP:
        {"layout": "pairs", "pair_task": "nsp"}); checked against the data module before the first step."""
        return {}


def corrupt_batch(objectives: Sequence[Objective], batch: Batch, generator: torch.Generator | None = None) -> Batch:
    """The batch after every objective's corruption: first those that move tokens to other positions (SOP's swap),
    then the token-level ones (MLM's masks, RTD's replacements), each group in the given order. Labels are made by
    position, so a token-level label made before a swap would label whatever token the swap moved there: this order
    keeps every per-token label on the token at its position whatever order a recipe lists the objectives in."""
    for objective in sorted(objectives, key=lambda o: not o.rearranges_tokens):  # stable: the given order otherwise
        batch = objective.corrupt(batch, generator)
    return batch


class SegmentPairClassification(Objective):
    """A 2-way classification of a segment pair from its [CLS] state (NSP, SOP): the head, the loss and the accuracy;
    subclasses name the batch field holding the labels (`label_key`) and how the pairs are made."""

    pair_task = True
    label_key: ClassVar[str]

    def make_head(self, backbone: Transformer) -> Head:
        return ClassificationHead(backbone, num_labels=2, dropout=0.0)  # BERT's and ALBERT's: no dropout on [CLS]

    def forward(self, hidden_states: Tensor, batch: Batch) -> ObjectiveOutput:
        logits = self.head(hidden_states)  # (B, 2)
        labels = batch[self.label_key]
        return ObjectiveOutput(F.cross_entropy(logits.float(), labels), accuracy_of(logits, labels))


def check_combination(objectives: list[Objective], config: TransformerConfig) -> None:
    """Raise ValueError, naming both pieces, if these objectives cannot train together on this backbone (the data
    are checked against `Objective.data_requirements` once they exist)."""
    if not objectives:
        raise ConfigError("no objective given: add at least one (e.g. objectives.MaskedLM)")
    names = [o.name for o in objectives]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"objective {duplicates[0]} is given twice; give each objective once")
    for first in objectives:
        for second in objectives[objectives.index(first) + 1:]:
            if first.attention != second.attention:
                raise ConfigError(f"{first.name} needs {first.attention} attention and {second.name} needs "
                                 f"{second.attention} attention; they cannot train on one backbone")
            if first.corrupts_tokens and second.corrupts_tokens:
                raise ConfigError(f"{first.name} and {second.name} both rewrite the input tokens and cannot share "
                                 "one forward pass; keep one of them")
            if first.pair_task and second.pair_task:
                raise ConfigError(f"{first.name} and {second.name} are both sentence-pair tasks; keep one of them")
    backbone_attention = "causal" if config.causal else "bidirectional"
    for objective in objectives:
        if objective.attention != backbone_attention:
            raise ConfigError(
                f"{objective.name} needs a {objective.attention} backbone but the model has causal={config.causal}; "
                f"set causal={objective.attention == 'causal'} in the model config"
            )


def data_mismatches(objectives: list[Objective], data: dict[str, object]) -> list[str]:
    """What the objectives need from the data that `data` (the data module's settings by name) does not give, one
    line each, naming the setting and the fix."""
    problems = []
    for objective in objectives:
        for key, wanted in objective.data_requirements().items():
            if data.get(key) != wanted:
                problems.append(f"{objective.name} needs data.{key} {wanted!r} but the data module has "
                                f"{data.get(key)!r}: set --data.{key} {wanted}, or drop the {objective.name} objective")
    return problems


class _LabelCrossEntropy(torch.autograd.Function):
    """Cross-entropy and accuracy over a large vocabulary in few passes over the (N, V) logits: the forward keeps
    exp(logits - max) (fp32) instead of the logits and log-softmax, and the backward turns it into the gradient in
    place. The row maximum gives the accuracy for free (no separate argmax)."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, ignore_index: int, overwrite: bool) -> tuple[Tensor, Tensor]:
        valid = labels != ignore_index
        safe = labels.masked_fill(~valid, 0)[:, None]
        maximum = logits.max(dim=-1, keepdim=True).values
        target = logits.gather(1, safe)
        buffer = logits.detach() if overwrite and logits.dtype == torch.float32 else logits.float().clone()
        exp = buffer.sub_(maximum.float()).exp_()
        total = exp.sum(dim=-1, keepdim=True)
        count = valid.sum().clamp(min=1)
        losses = (total.log() + maximum.float() - target.float()).squeeze(1) * valid
        ctx.save_for_backward(exp, total, safe, valid, count)
        ctx.logits_dtype = logits.dtype
        correct = (target.squeeze(1) >= maximum.squeeze(1)) & valid  # a tie with the maximum counts as right
        return losses.sum() / count, correct.float()

    @staticmethod
    def backward(ctx, grad_loss: Tensor, grad_correct: Tensor):
        exp, total, safe, valid, count = ctx.saved_tensors
        scale = (grad_loss / count) * valid[:, None]
        grad = exp.mul_(scale / total)  # softmax * scale, in place on the saved buffer (backward runs once)
        grad.scatter_add_(1, safe, -scale)
        return grad.to(ctx.logits_dtype), None, None, None


def label_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = -100, overwrite_logits: bool = False
                        ) -> tuple[Tensor, Tensor]:
    """(mean cross-entropy over the labels that are not `ignore_index` (0 when there are none), 1.0 where the
    label has the largest logit (0 where ignored)). Equals F.cross_entropy's mean and `accuracy_of` (up to ties),
    with less memory traffic. With `overwrite_logits` (fp32 logits that nothing else reads, e.g. fresh from the
    output layer) their memory is reused instead of allocating another (N, V) buffer. logits (N, V), labels (N,)."""
    return _LabelCrossEntropy.apply(logits, labels, ignore_index, overwrite_logits)


def mean_cosine_similarity(states: Tensor, weights: Tensor) -> Tensor:
    """The mean cosine similarity between the states of every two different tokens where `weights` is 1 (real
    tokens): near 1 when the representations have collapsed to one direction. states (B, T, H), weights (B, T);
    O(B T H), from the sum of the unit vectors: |sum u|^2 = N + sum over pairs i != j of u_i . u_j."""
    units = F.normalize(states.float(), dim=-1) * weights[..., None]
    count = weights.sum()
    total = units.sum(dim=(0, 1))
    return (total.pow(2).sum() - count) / (count * (count - 1)).clamp(min=1)


def accuracy_of(logits: Tensor, labels: Tensor) -> Tensor:
    """1.0 where argmax(logits) == label. logits (N, C), labels (N,) -> (N,)"""
    return (logits.argmax(dim=-1) == labels).float()
