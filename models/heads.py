"""Heads on the backbone's hidden states (B, T, H). No losses here: objectives compute those.

Every head is called as `head(hidden_states)`, so a backbone with any set of heads is `ModelWithHeads`.
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from models.config import TransformerConfig
from models.transformer import Transformer, activation_module, init_weights


class LMHead(nn.Module):
    """Token logits tied to the input embeddings: H -> E transform, then E -> V with the (V, E) embedding matrix.

    `transform=True` is BERT's, ALBERT's and ELECTRA's head (dense H -> E, activation, LayerNorm); `transform=False`
    is GPT-2's (logits straight from the final hidden states; a plain H -> E projection only when E != H).
    """

    def __init__(
        self,
        config: TransformerConfig,
        word_embeddings: nn.Embedding,
        transform: bool = True,
        bias: bool = True,
        activation: str | None = None,
    ):
        super().__init__()
        if transform:
            self.transform = nn.Sequential(
                nn.Linear(config.hidden_size, config.embedding_size),
                activation_module(activation or config.activation),
                nn.LayerNorm(config.embedding_size, config.layer_norm_eps),
            )
        elif config.embedding_size != config.hidden_size:
            self.transform = nn.Linear(config.hidden_size, config.embedding_size, bias=False)
        else:
            self.transform = nn.Identity()
        self.weight = word_embeddings.weight  # tied: the same Parameter as the input embeddings
        self.bias = nn.Parameter(word_embeddings.weight.new_zeros(config.vocab_size)) if bias else None
        self.transform.apply(partial(init_weights, std=config.initializer_range))

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


class ClassificationHead(nn.Module):
    """[CLS] pooler, dropout, linear classifier: NSP, SOP and sequence-level fine-tuning. (B, T, H) -> (B, labels)"""

    def __init__(self, config: TransformerConfig, num_labels: int = 2, dropout: float | None = None):
        super().__init__()
        self.pooler = Pooler(config)
        self.dropout = nn.Dropout(config.dropout if dropout is None else dropout)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        init_weights(self.classifier, config.initializer_range)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.pooler(hidden_states)))


class TokenScorer(nn.Module):
    """ELECTRA's discriminator: one logit per token (dense H -> H, activation, H -> 1). (B, T, H) -> (B, T)"""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = activation_module(config.activation)
        self.out = nn.Linear(config.hidden_size, 1)
        self.apply(partial(init_weights, std=config.initializer_range))

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.out(self.activation(self.dense(hidden_states))).squeeze(-1)


class ModelWithHeads(nn.Module):
    """A backbone and named heads ("mlm", "nsp", "sop", "rtd", "clm") on its hidden states."""

    def __init__(self, backbone: Transformer, heads: dict[str, nn.Module]):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads)

    @property
    def config(self) -> TransformerConfig:
        return self.backbone.config

    def forward(self, input_ids: Tensor, **backbone_inputs) -> dict[str, Tensor]:
        """Every head's output on the full hidden states, keyed by head name, plus "hidden_states" (B, T, H)."""
        hidden_states = self.backbone(input_ids, **backbone_inputs)
        return {"hidden_states": hidden_states, **{name: head(hidden_states) for name, head in self.heads.items()}}


def make_head(name: str, config: TransformerConfig, backbone: Transformer, activation: str | None = None,
              num_labels: int = 2) -> nn.Module:
    """The head an objective of that name trains: "mlm" (tied LMHead with transform), "clm" (GPT-2's tied output),
    "rtd" (TokenScorer), "nsp" / "sop" (2-way ClassificationHead); "task" is a fine-tuned task's
    ClassificationHead with `num_labels` outputs (1 for regression)."""
    if name == "mlm":
        return LMHead(config, backbone.embeddings.word, activation=activation)
    if name == "clm":
        return LMHead(config, backbone.embeddings.word, transform=False, bias=False)
    if name == "rtd":
        return TokenScorer(config)
    if name in ("nsp", "sop"):
        return ClassificationHead(config, num_labels=2)
    if name == "task":
        return ClassificationHead(config, num_labels=num_labels)
    raise ValueError(f"unknown head {name!r}; heads are mlm, clm, rtd, nsp, sop")
