"""Heads on the backbone's hidden states (B, T, H). No losses here: objectives compute those.

Every head is called as `head(hidden_states)`, so a backbone with any set of heads is `ModelWithHeads`. Every head is
built as `Class(backbone, **init_args)` and keeps its `init_args` (plain values): `head_spec` records a head as its
class path and arguments, and `build_head` rebuilds it from that record, so a saved model brings back any head,
including an objective's own, without a table of names here.
"""

from __future__ import annotations

import abc
import importlib
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from models.config import ConfigError, TransformerConfig
from models.transformer import Transformer, activation_module, init_weights

# Packages whose classes a saved model may name as its heads: rebuilding a head never imports anything else.
HEAD_PACKAGES = ("models.", "objectives.")


class Head(nn.Module):
    """A head, rebuildable from `head_spec(head)`: subclasses take `(backbone, **init_args)` and pass the init_args
    (plain values: numbers, strings, booleans, None) to this constructor."""

    def __init__(self, **init_args: Any):
        super().__init__()
        self.init_args = init_args


def head_spec(head: nn.Module) -> dict[str, Any]:
    """{"class_path": "package.module.Class", "init_args": {...}}: what `build_head` needs to rebuild `head`."""
    if not isinstance(head, Head):
        raise TypeError(f"{type(head).__name__} is not a models.heads.Head: it cannot be saved and rebuilt")
    cls = type(head)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(head.init_args)}


def build_head(spec: dict[str, Any], backbone: Transformer) -> Head:
    """The head a `head_spec` describes, on `backbone` (fresh weights: load a state dict after). Only classes of
    `HEAD_PACKAGES` that are `Head`s are built: a saved file cannot make this import or call anything else."""
    module_name, _, class_name = str(spec.get("class_path", "")).rpartition(".")
    if not module_name.startswith(HEAD_PACKAGES):
        raise ConfigError(f"head class {spec.get('class_path')!r} is not in {', '.join(HEAD_PACKAGES)}: not built")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Head)):
        raise ConfigError(f"{spec.get('class_path')!r} is not a head class (models.heads.Head)")
    return cls(backbone, **spec.get("init_args", {}))


class LMHead(Head):
    """Token logits: H -> E transform, then E -> V with the (V, E) token embedding matrix (tied), or with a matrix of
    its own when the config unties them (`tie_word_embeddings=False`, Llama).

    `transform=True` is BERT's, ALBERT's and ELECTRA's head (dense H -> E, activation, LayerNorm); `transform=False`
    is GPT-2's (logits straight from the final hidden states; a plain H -> E projection only when E != H).
    """

    def __init__(self, backbone: Transformer, transform: bool = True, bias: bool = True, activation: str | None = None):
        super().__init__(transform=transform, bias=bias, activation=activation)
        config, word_embeddings = backbone.config, backbone.embeddings.word
        if transform:
            self.transform = nn.Sequential(
                nn.Linear(config.hidden_size, config.token_embedding_size, bias=config.bias),
                activation_module(activation or config.activation),
                nn.LayerNorm(config.token_embedding_size, config.layer_norm_eps, bias=config.bias),
            )
        elif config.token_embedding_size != config.hidden_size:
            self.transform = nn.Linear(config.hidden_size, config.token_embedding_size, bias=False)
        else:
            self.transform = nn.Identity()
        self.tied = config.tie_word_embeddings
        if self.tied:
            self.weight = word_embeddings.weight  # the same Parameter as the input embeddings
        else:
            self.weight = nn.Parameter(torch.empty_like(word_embeddings.weight))
            nn.init.normal_(self.weight, std=config.initializer_range)
        self.bias = nn.Parameter(word_embeddings.weight.new_zeros(config.vocab_size)) if bias else None
        self.transform.apply(partial(init_weights, std=config.initializer_range))

    def retie(self, backbone: Transformer) -> None:
        """After the backbone's embeddings grew (tokens added): tie to them again, or grow an own matrix by as many
        rows (drawn like the initial ones); the bias gets zeros for the new tokens."""
        embeddings = backbone.embeddings.word.weight
        if self.tied:
            self.weight = embeddings
        elif len(self.weight) < len(embeddings):
            grown = torch.empty_like(embeddings).normal_(std=backbone.config.initializer_range)
            grown[: len(self.weight)] = self.weight.detach()
            self.weight = nn.Parameter(grown)
        if self.bias is not None and len(self.bias) < len(embeddings):
            grown = self.bias.new_zeros(len(embeddings))
            grown[: len(self.bias)] = self.bias.detach()
            self.bias = nn.Parameter(grown)

    def forward(self, hidden_states: Tensor) -> Tensor:
        """(..., H) -> logits (..., V). Gather the positions you need first: the V-wide matmul dominates."""
        return nn.functional.linear(self.transform(hidden_states), self.weight, self.bias)


class Pooler(nn.Module):
    """BERT's pooler: dense H -> H and tanh on the first ([CLS]) token. (B, T, H) -> (B, H)"""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        init_weights(self.dense, config.initializer_range)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.dense(hidden_states[:, 0]).tanh()


class SequenceHead(Head, abc.ABC):
    """A sequence-level head: `pool` makes one vector per row, `classify` (dropout, linear) maps it to labels;
    `forward` is the two in a row. They are separate so that fine-tuning can add the vectors of two inputs first
    (GPT-1's symmetric pairs). (B, T, H) -> (B, labels)"""

    def __init__(self, backbone: Transformer, num_labels: int = 2, dropout: float | None = None):
        super().__init__(num_labels=num_labels, dropout=dropout)
        config = backbone.config
        self.dropout = nn.Dropout(config.dropout if dropout is None else dropout)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        init_weights(self.classifier, config.initializer_range)

    @abc.abstractmethod
    def pool(self, hidden_states: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, T, H), (B, T) 1 for real tokens -> (B, H): which position(s) the head reads, each subclass its own."""

    def classify(self, features: Tensor) -> Tensor:
        """(B, H) -> (B, labels)"""
        return self.classifier(self.dropout(features))

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.classify(self.pool(hidden_states, attention_mask))


class ClassificationHead(SequenceHead):
    """BERT's: [CLS] pooler, dropout, linear classifier: NSP, SOP and encoder fine-tuning. (B, T, H) -> (B, labels)"""

    def __init__(self, backbone: Transformer, num_labels: int = 2, dropout: float | None = None):
        super().__init__(backbone, num_labels, dropout)
        self.pooler = Pooler(backbone.config)

    def pool(self, hidden_states: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.pooler(hidden_states)


def last_token(hidden_states: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Each row's hidden state at its last real token, rows padded on the right. (B, T, H), (B, T) -> (B, H)"""
    if attention_mask is None:
        return hidden_states[:, -1]
    last = (attention_mask.sum(1) - 1).clamp(min=0)  # (B,)
    return hidden_states[torch.arange(len(hidden_states), device=hidden_states.device), last]


class MeanPoolingClassifier(SequenceHead):
    """Dropout and a linear classifier on the mean of each row's hidden states over its real tokens (the read-out of
    sentence-transformers). Every token's state reaches the loss directly, so an encoder whose [CLS] has learnt
    nothing yet (random weights, a short pretraining) still fits: a post-LN encoder's [CLS] states start nearly
    identical for every input (mean cosine 0.9999 at initialisation) and move slowly. (B, T, H) -> (B, labels)"""

    def pool(self, hidden_states: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if attention_mask is None:
            return hidden_states.mean(dim=1)
        weights = attention_mask.to(hidden_states.dtype).unsqueeze(-1)  # (B, T, 1)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


class LastTokenClassifier(SequenceHead):
    """GPT-1's task head: dropout and a linear classifier on the hidden state of each row's last real token (the
    extract token), the one position a causal model has let see the whole input. (B, T, H) -> (B, labels)"""

    def pool(self, hidden_states: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return last_token(hidden_states, attention_mask)


class TokenScorer(Head):
    """ELECTRA's discriminator: one logit per token (dense H -> H, activation, H -> 1). (B, T, H) -> (B, T)

    Initialised as Google's ELECTRA (run_pretraining.py) does: the dense layer N(0, initializer_range), the output
    layer Glorot-uniform (TensorFlow's default for a layer given no initializer), biases 0. (Hugging Face's
    ElectraForPreTraining draws both from N(0, 0.02): at H = 256 its output layer starts 4.4 times smaller.)"""

    def __init__(self, backbone: Transformer):
        super().__init__()
        config = backbone.config
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = activation_module(config.activation)
        self.out = nn.Linear(config.hidden_size, 1)
        self.apply(partial(init_weights, std=config.initializer_range))
        nn.init.xavier_uniform_(self.out.weight)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.out(self.activation(self.dense(hidden_states))).squeeze(-1)


class ModelWithHeads(nn.Module):
    """A backbone and named heads on its hidden states (named after the objectives that trained them, or "task")."""

    def __init__(self, backbone: Transformer, heads: dict[str, nn.Module]):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads)

    @property
    def config(self) -> TransformerConfig:
        return self.backbone.config

    def resize_vocabulary(self, vocab_size: int) -> None:
        """Grow the token embeddings to `vocab_size` rows (tokens added to the tokenizer) and tie the LM heads to
        them again."""
        self.backbone.resize_vocabulary(vocab_size)
        for head in self.heads.values():
            if isinstance(head, LMHead):
                head.retie(self.backbone)

    def forward(self, input_ids: Tensor, **backbone_inputs) -> dict[str, Tensor]:
        """Every head's output on the full hidden states, keyed by head name, plus "hidden_states" (B, T, H)."""
        hidden_states = self.backbone(input_ids, **backbone_inputs)
        return {"hidden_states": hidden_states, **{name: head(hidden_states) for name, head in self.heads.items()}}
