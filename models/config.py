"""`TransformerConfig`: one typed, validated dataclass for every architecture variant.

Each field's default means "off" or "BERT". Presets reproduce the published families (BERT, RoBERTa, ModernBERT,
ALBERT, ELECTRA, GPT-2, a Llama-style decoder) so that their parameter counts match Hugging Face's models.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

NormPosition = Literal["post", "pre"]
PositionEmbedding = Literal["learned", "sinusoidal", "rotary"]
PositionCombine = Literal["sum", "concat"]
Activation = Literal["gelu", "gelu_tanh", "relu", "silu"]
Norm = Literal["layernorm", "rmsnorm"]
FeedForwardKind = Literal["mlp", "glu"]
Sharing = Literal["none", "all", "attention", "ffn"]
AttentionMasks = Literal["dense", "blocks"]
Checkpointing = Literal["none", "blocks"]


class ConfigError(ValueError):
    """A configuration that cannot work (a model's, an objective's, an optimizer's): the user can fix it, and the
    message says how. The CLI prints it as one line; any other exception is a bug and keeps its traceback."""


@dataclass
class TransformerConfig:
    vocab_size: int = 30522
    hidden_size: int = 768  # H: width of every Transformer layer
    num_layers: int = 12  # depth; with sharing, the number of times the shared layers run
    num_heads: int = 12
    intermediate_size: int | None = None  # FFN width; None means 4 * hidden_size
    embedding_size: int | None = None  # E; E < H is ALBERT's factorized embedding (V x E + E x H); None means H
    max_position_embeddings: int = 512
    type_vocab_size: int = 2  # segment (token type) embeddings; 0 means none (GPT-2)
    position_embedding: PositionEmbedding = "learned"  # learned (BERT/GPT), sinusoidal (Vaswani et al.), rotary
    # sum (BERT, the Transformer): positions added to the token embeddings; concat: the token embedding gets
    # E - position_size dimensions and the position embedding position_size, side by side (separate subspaces, at a
    # cost in the token embedding's width)
    position_combine: PositionCombine = "sum"
    position_size: int | None = None  # concat only: the position embedding's width
    rotary_base: float = 10000.0  # theta of rotary embeddings; used only when position_embedding == "rotary"
    norm_position: NormPosition = "post"  # post-LN (BERT) or pre-LN (GPT-2); pre-LN adds a final LayerNorm
    causal: bool = False  # decoder (GPT) when True, bidirectional encoder otherwise
    activation: Activation = "gelu"  # gelu (exact, BERT/ELECTRA), gelu_tanh (GPT-2/ALBERT's gelu_new), relu, silu
    ffn: FeedForwardKind = "mlp"  # mlp: down(act(up(x))); glu: down(act(gate(x)) * up(x)) (GeGLU, SwiGLU with silu)
    norm: Norm = "layernorm"  # layernorm (BERT, GPT-2) or rmsnorm (Llama, T5: no centring, no bias); eps below
    bias: bool = True  # biases in the linear layers and norms (Llama and ModernBERT have none)
    num_kv_heads: int | None = None  # grouped-query attention (Llama 2/3): fewer key/value heads; None = num_heads
    # a norm on the embeddings: None = as the norm position implies (post-LN: yes, BERT; pre-LN: no, GPT-2); True with
    # pre-LN is ModernBERT's
    embedding_norm: bool | None = None
    tie_word_embeddings: bool = True  # the LM output layer is the token embedding matrix (False: its own, Llama)
    # Local attention (ModernBERT: a 128-token window, every third layer global): a token sees the tokens within
    # window // 2 on either side (causal: the window - 1 before it) in every layer except each
    # global_attention_every-th (layers 0, k, 2k, ...). None: every layer global.
    local_attention_window: int | None = None
    global_attention_every: int = 1
    local_rotary_base: float | None = None  # rotary theta of the local layers (ModernBERT: 10,000); None: rotary_base
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1  # on embeddings and on each residual branch
    attention_dropout: float = 0.1  # on the attention probabilities
    sharing: Sharing = "none"  # cross-layer parameter sharing (ALBERT): none, all, attention-only, ffn-only
    num_shared_groups: int = 1  # with sharing: the layers are split into this many groups, one set of weights each
    initializer_range: float = 0.02  # std of the normal initialisation
    scaled_residual_init: bool = False  # GPT-2: residual output projections get std / sqrt(2 * num_layers)
    # Activation checkpointing, in training: "blocks" keeps only the input of every checkpoint_every-th layer
    # (attention + feed-forward) for backward and runs that layer again there (memory for compute; the same
    # gradients: dropout draws the same masks again). Not part of the weights: a resume may turn it on or off.
    activation_checkpointing: Checkpointing = "none"
    checkpoint_every: int = 1
    # How attention masks are made: "dense" builds a boolean (T x T) mask (documents, padding, local windows; the
    # reference); "blocks" builds nothing quadratic in T: each document attends in a row of its own and local layers
    # in chunks against their window (models/block_attention.py; the same outputs at every real token). For long
    # sequences. Not part of the weights: a resume may change it.
    attention_masks: AttentionMasks = "dense"

    def __post_init__(self) -> None:
        for name, choices in (
            ("position_embedding", PositionEmbedding),
            ("position_combine", PositionCombine),
            ("norm_position", NormPosition),
            ("activation", Activation),
            ("sharing", Sharing),
            ("ffn", FeedForwardKind),
            ("norm", Norm),
            ("activation_checkpointing", Checkpointing),
            ("attention_masks", AttentionMasks),
        ):
            value = getattr(self, name)
            if value not in get_args(choices):
                raise ConfigError(f"{name}={value!r} is not one of {list(get_args(choices))}")
        if self.embedding_norm is None:
            self.embedding_norm = self.norm_position == "post"
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.embedding_size is None:
            self.embedding_size = self.hidden_size
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "embedding_size", "max_position_embeddings", "num_shared_groups", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.type_vocab_size < 0:
            raise ConfigError(
                f"type_vocab_size must be >= 0 (0 means no segment embeddings), got {self.type_vocab_size}"
            )
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})")
        if self.local_attention_window is not None and self.local_attention_window < 2:
            raise ConfigError(f"local_attention_window must be at least 2, got {self.local_attention_window}")
        if self.global_attention_every < 1:
            raise ConfigError(f"global_attention_every must be at least 1, got {self.global_attention_every}")
        if self.local_attention_window is None and self.global_attention_every != 1:
            raise ConfigError("global_attention_every needs a local_attention_window for the other layers")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.position_embedding == "rotary" and self.head_size % 2:
            raise ConfigError(f"rotary positions need an even head size, got hidden_size / num_heads = "
                              f"{self.head_size}")
        if self.position_combine == "concat":
            if self.position_embedding == "rotary":
                raise ConfigError("position_combine='concat' needs learned or sinusoidal positions (rotary positions "
                                 "act inside attention, not on the embeddings)")
            if self.position_size is None or not 0 < self.position_size < self.embedding_size:
                raise ConfigError(f"position_combine='concat' needs position_size between 1 and embedding_size - 1 "
                                 f"({self.embedding_size - 1}), got {self.position_size}")
        elif self.position_size is not None:
            raise ConfigError(f"position_size={self.position_size} is for position_combine='concat'; leave it out "
                             "with 'sum' (positions then have the embedding's width)")
        if self.position_embedding == "sinusoidal" and self.position_width % 2:
            raise ConfigError(f"sinusoidal positions need an even width, got {self.position_width}")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.sharing == "none" and self.num_shared_groups != 1:
            raise ConfigError(
                f"num_shared_groups={self.num_shared_groups} needs cross-layer sharing: set sharing to "
                "'all', 'attention' or 'ffn', or leave num_shared_groups at 1"
            )
        if self.num_layers % self.num_shared_groups:
            raise ConfigError(
                f"num_layers ({self.num_layers}) must be divisible by num_shared_groups ({self.num_shared_groups})"
            )

    def is_local(self, layer: int) -> bool:
        """Whether the layer at depth `layer` attends within the local window."""
        return self.local_attention_window is not None and layer % self.global_attention_every != 0

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def position_width(self) -> int:
        """The position embedding's width: position_size (concat) or the embedding size (sum)."""
        return self.position_size if self.position_combine == "concat" else self.embedding_size

    @property
    def token_embedding_size(self) -> int:
        """The token (and segment) embedding's width, which tied output layers project to: E, or E - position_size
        with concat."""
        return self.embedding_size - (self.position_size if self.position_combine == "concat" else 0)

    def layer_groups(self, shared: bool) -> list[int]:
        """For each of the `num_layers` positions, the index of the weights it runs (ALBERT's grouping)."""
        if not shared:
            return list(range(self.num_layers))
        return [i * self.num_shared_groups // self.num_layers for i in range(self.num_layers)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TransformerConfig:
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown TransformerConfig fields: {unknown}")
        return cls(**values)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TransformerConfig:
        """A published architecture by name (see `PRESETS`), with optional field overrides."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


_BERT = dict(vocab_size=30522, max_position_embeddings=512, type_vocab_size=2)
_ALBERT = dict(
    vocab_size=30000, embedding_size=128, sharing="all", activation="gelu_tanh", dropout=0.0, attention_dropout=0.0,
)
_GPT2 = dict(
    vocab_size=50257, max_position_embeddings=1024, type_vocab_size=0, norm_position="pre", causal=True,
    activation="gelu_tanh", layer_norm_eps=1e-5, scaled_residual_init=True,
)
_ROBERTA = dict(vocab_size=50265, max_position_embeddings=512, type_vocab_size=1, layer_norm_eps=1e-5)
# A Llama-family decoder at TinyLlama-1.1B's sizes: rotary positions, SwiGLU, RMSNorm, no biases, 4 key/value heads
# for 32 query heads, untied output layer.
_LLAMA = dict(vocab_size=32000, hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4, intermediate_size=5632,
              max_position_embeddings=2048, type_vocab_size=0, position_embedding="rotary", norm_position="pre",
              causal=True, activation="silu", ffn="glu", norm="rmsnorm", bias=False, layer_norm_eps=1e-5,
              dropout=0.0, attention_dropout=0.0, tie_word_embeddings=False)
# ModernBERT-base (Warner et al. 2024): pre-LN with an embedding norm, rotary (160,000 global, 10,000 local), GeGLU,
# no biases, a 128-token window with every third layer global, context 8192.
_MODERNBERT = dict(vocab_size=50368, hidden_size=768, num_layers=22, num_heads=12, intermediate_size=1152,
                   max_position_embeddings=8192, type_vocab_size=0, position_embedding="rotary", rotary_base=160000.0,
                   local_rotary_base=10000.0, norm_position="pre", embedding_norm=True, activation="gelu", ffn="glu",
                   bias=False, layer_norm_eps=1e-5, dropout=0.0, attention_dropout=0.0, local_attention_window=128,
                   global_attention_every=3)
_TINY = dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, max_position_embeddings=128)

PRESETS: dict[str, dict[str, Any]] = {
    "bert-base": dict(_BERT, hidden_size=768, num_layers=12, num_heads=12),
    "bert-large": dict(_BERT, hidden_size=1024, num_layers=24, num_heads=16),
    "albert-base": dict(_ALBERT, hidden_size=768, num_layers=12, num_heads=12),
    "albert-large": dict(_ALBERT, hidden_size=1024, num_layers=24, num_heads=16),
    "albert-xlarge": dict(_ALBERT, hidden_size=2048, num_layers=24, num_heads=16),
    "albert-xxlarge": dict(_ALBERT, hidden_size=4096, num_layers=12, num_heads=64),
    "electra-small": dict(_BERT, embedding_size=128, hidden_size=256, num_layers=12, num_heads=4),
    # Generators at the sizes the ELECTRA paper recommends (1/4 of small, 1/3 of base in width, FFN and heads);
    # Google's released small generator checkpoint is full-size instead.
    "electra-small-generator": dict(_BERT, embedding_size=128, hidden_size=64, num_layers=12, num_heads=1),
    "electra-base": dict(_BERT, hidden_size=768, num_layers=12, num_heads=12),
    "electra-base-generator": dict(_BERT, embedding_size=768, hidden_size=256, num_layers=12, num_heads=4),
    "gpt2-small": dict(_GPT2, hidden_size=768, num_layers=12, num_heads=12),
    "gpt2-medium": dict(_GPT2, hidden_size=1024, num_layers=24, num_heads=16),
    "roberta-base": dict(_ROBERTA, hidden_size=768, num_layers=12, num_heads=12),
    "llama-style": _LLAMA,
    "modernbert-base": _MODERNBERT,
    "bert-tiny": dict(_BERT, **_TINY, vocab_size=1000),
    "albert-tiny": dict(_ALBERT, **_TINY, vocab_size=1000, embedding_size=32),
    "electra-tiny": dict(_BERT, **_TINY, vocab_size=1000, embedding_size=32),
    "electra-tiny-generator": dict(_BERT, **dict(_TINY, hidden_size=32, intermediate_size=64), vocab_size=1000,
                                   embedding_size=32),
    "gpt2-tiny": dict(_GPT2, **_TINY, vocab_size=1000),
}
