"""The Transformer backbone: embeddings, a stack of (possibly shared) attention and FFN layers, hidden states out.

Pure PyTorch. Every architecture variant is a field of `TransformerConfig`; a part that is switched off is
absent from the module tree (no `hasattr` checks). Shapes: B batch, T sequence, H hidden, E embedding,
N heads, D head size.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.block_attention import Band, GroupedRows, local_attention, token_groups
from models.config import TransformerConfig


def activation_module(name: str) -> nn.Module:
    """The activation called `name` in `TransformerConfig.activation`."""
    return {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "relu": nn.ReLU(), "silu": nn.SiLU()}[name]


def norm_module(config: TransformerConfig, size: int) -> nn.Module:
    """The configured norm over the last `size` features: LayerNorm (with a bias unless `bias` is off) or RMSNorm."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(size, eps=config.layer_norm_eps)
    return nn.LayerNorm(size, config.layer_norm_eps, bias=config.bias)


def init_weights(module: nn.Module, std: float) -> None:
    """The families' initialisation: Linear and Embedding weights ~ N(0, std), biases 0, norms' scales 1."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
    if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        nn.init.ones_(module.weight)


def sinusoidal_table(num_positions: int, size: int) -> Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/size)), PE(pos, 2i+1) = cos(...) ("Attention Is All You Need"). (P, size)"""
    position = torch.arange(num_positions, dtype=torch.float64).unsqueeze(1)  # (P, 1)
    inverse_frequency = torch.pow(10000.0, -torch.arange(0, size, 2, dtype=torch.float64) / size)  # (size/2,)
    table = torch.zeros(num_positions, size, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * inverse_frequency)
    table[:, 1::2] = torch.cos(position * inverse_frequency)
    return table.float()


def rotary_angles(position_ids: Tensor, head_size: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles pos * base^(-2i/D), each (B, 1, T, D), halves repeated (rotate-half layout)."""
    inverse_frequency = base ** (-torch.arange(0, head_size, 2, device=position_ids.device).float() / head_size)
    angles = position_ids.float().unsqueeze(-1) * inverse_frequency  # (B, T, D/2)
    angles = torch.cat((angles, angles), dim=-1).unsqueeze(1)  # (B, 1, T, D)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x_i, x_{i+D/2}) of queries or keys (B, N, T, D) by their position's angle."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class Embeddings(nn.Module):
    """Token + segment + (learned or sinusoidal) position embeddings of size E, then LayerNorm (post-LN only),
    dropout, and an E -> H projection when E != H (ALBERT's factorized embedding)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.token_embedding_size)
        if config.type_vocab_size > 0:
            self.token_type = nn.Embedding(config.type_vocab_size, config.token_embedding_size)
        if config.position_embedding == "learned":
            self.position = nn.Embedding(config.max_position_embeddings, config.position_width)
        elif config.position_embedding == "sinusoidal":
            table = sinusoidal_table(config.max_position_embeddings, config.position_width)
            self.register_buffer("sinusoidal", table, persistent=False)
        self.concat = config.position_combine == "concat"
        # Post-LN models (BERT) normalise the embeddings; pre-LN ones (GPT-2) inside each layer, ModernBERT both.
        self.norm = norm_module(config, config.embedding_size) if config.embedding_norm else nn.Identity()
        self.dropout = nn.Dropout(config.dropout)
        self.projection = nn.Linear(config.embedding_size, config.hidden_size, bias=config.bias) \
            if config.embedding_size != config.hidden_size else nn.Identity()
        self.type_vocab_size = config.type_vocab_size
        self.position_embedding = config.position_embedding

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None, position_ids: Tensor) -> Tensor:
        x = self.word(input_ids)  # (B, T, E), or (B, T, E - P) with concat
        if self.type_vocab_size > 0:
            x = x + self.token_type(token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids))
        positions = None
        if self.position_embedding == "learned":
            positions = self.position(position_ids)
        elif self.position_embedding == "sinusoidal":
            positions = self.sinusoidal[position_ids].to(x.dtype)
        if positions is not None:  # (B, T, E) to add, or (B, T, P) to put beside the tokens' E - P
            x = torch.cat([x, positions.expand(*x.shape[:2], -1)], dim=-1) if self.concat else x + positions
        return self.projection(self.dropout(self.norm(x)))  # (B, T, H)


class KVCache:
    """Keys and values of the tokens seen so far, one slot per layer position (a shared layer that runs at several
    depths has a slot at each), so that generating a token costs one position's forward pass."""

    def __init__(self, num_layers: int):
        self.slots: list[tuple[Tensor, Tensor] | None] = [None] * num_layers

    @property
    def length(self) -> int:
        """The number of cached positions."""
        return 0 if self.slots[0] is None else self.slots[0][0].shape[2]

    def extend(self, position: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Append this step's keys and values (B, N, T_new, D) at a layer position; all of them (B, N, T, D)."""
        if self.slots[position] is not None:
            keys = torch.cat([self.slots[position][0], keys], dim=2)
            values = torch.cat([self.slots[position][1], values], dim=2)
        self.slots[position] = (keys, values)
        return keys, values

    def reorder(self, rows: Tensor) -> None:
        """Keep rows `rows` (B',) of the batch in this order (beam search)."""
        self.slots = [None if s is None else (s[0][rows], s[1][rows]) for s in self.slots]


class Sublayer(nn.Module):
    """A residual branch f with its LayerNorm: post-LN x = norm(x + f(x)), pre-LN x = x + f(norm(x)).

    Subclasses define f as `branch(x, **kwargs)`.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.norm = norm_module(config, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.pre_norm = config.norm_position == "pre"

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        if self.pre_norm:
            return x + self.dropout(self.branch(self.norm(x), **kwargs))
        return self.norm(x + self.dropout(self.branch(x, **kwargs)))


class Attention(Sublayer):
    """Multi-head self-attention through `scaled_dot_product_attention` (scale 1/sqrt(D)), fused QKV projection;
    with `num_kv_heads` < `num_heads`, grouped-query attention (each key/value head serves a group of query heads)."""

    def __init__(self, config: TransformerConfig):
        super().__init__(config)
        D = config.head_size
        self.sizes = [config.num_heads * D, config.num_kv_heads * D, config.num_kv_heads * D]  # q, k, v
        self.qkv = nn.Linear(config.hidden_size, sum(self.sizes), bias=config.bias)
        self.out = nn.Linear(config.hidden_size, config.hidden_size, bias=config.bias)
        self.num_heads, self.num_kv_heads, self.head_size = config.num_heads, config.num_kv_heads, D
        self.attention_dropout = config.attention_dropout

    def branch(self, x: Tensor, mask: Tensor | GroupedRows | Band | None, is_causal: bool,
               rotary: tuple[Tensor, Tensor] | None, cache: KVCache | None = None, position: int = 0) -> Tensor:
        B, T, H = x.shape
        q, k, v = self.qkv(x).split(self.sizes, dim=-1)
        q = q.view(B, T, self.num_heads, self.head_size).transpose(1, 2)  # (B, N, T, D)
        k, v = (t.view(B, T, self.num_kv_heads, self.head_size).transpose(1, 2) for t in (k, v))  # (B, KV, T, D)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:
            k, v = cache.extend(position, k, v)  # (B, N, T_cached + T, D)
        dropout, gqa = self.attention_dropout if self.training else 0.0, self.num_kv_heads != self.num_heads
        if isinstance(mask, GroupedRows):  # attention_masks: blocks (models/block_attention.py)
            y = mask.attend(q, k, v, is_causal, dropout, gqa)
        elif isinstance(mask, Band):
            y = local_attention(q, k, v, mask.groups, mask.window, mask.causal, dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout,
                                               enable_gqa=gqa)  # (B, N, T, D)
        return self.out(y.transpose(1, 2).reshape(B, T, H))


class FeedForward(Sublayer):
    """Position-wise H -> intermediate -> H: down(act(up(x))), or with `ffn="glu"` down(act(gate) * value), where
    up(x) = [gate, value] (GeGLU with gelu, SwiGLU with silu)."""

    def __init__(self, config: TransformerConfig):
        super().__init__(config)
        self.glu = config.ffn == "glu"
        widths = 2 * config.intermediate_size if self.glu else config.intermediate_size
        self.up = nn.Linear(config.hidden_size, widths, bias=config.bias)
        self.activation = activation_module(config.activation)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.bias)

    def branch(self, x: Tensor) -> Tensor:
        if self.glu:
            gate, value = self.up(x).chunk(2, dim=-1)
            return self.down(self.activation(gate) * value)
        return self.down(self.activation(self.up(x)))


def attention_mask_for(
    attention_mask: Tensor | None, document_ids: Tensor | None, causal: bool, query_length: int, key_length: int,
    device: torch.device,
) -> tuple[Tensor | None, bool]:
    """The boolean mask (True = may attend) for SDPA and its `is_causal` flag. The queries are the last
    `query_length` of the `key_length` positions (fewer than the keys when earlier ones come from a KV cache).

    attention_mask (B, T_key): 1 for real tokens, 0 for padding keys. document_ids (B, T): packed sequences attend
    only within their own document (block-diagonal). A purely causal mask is left to SDPA's `is_causal` (flash
    kernels) when queries and keys coincide.
    """
    offset = key_length - query_length  # the absolute position of query j is offset + j
    if attention_mask is None and document_ids is None and (offset == 0 or not causal or query_length == 1):
        return None, causal and offset == 0
    mask = torch.ones(1, 1, 1, key_length, dtype=torch.bool, device=device)  # (B, 1, T_query, T_key) broadcast
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, None, :]
    if document_ids is not None:
        mask = mask & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
    square = torch.ones(query_length, key_length, dtype=torch.bool, device=device)
    if causal:
        mask = mask & square.tril(offset)
    # Every query keeps itself, so no row is fully masked (a padded query would give NaN, which leaks through V).
    mask = mask | (square.tril(offset) & ~square.tril(offset - 1))
    return mask, False


def local_mask(mask: Tensor | None, is_causal: bool, window: int, causal: bool, query_length: int, key_length: int,
               device: torch.device) -> Tensor:
    """The global layers' mask (`attention_mask_for`) narrowed to a window: query i (at absolute position
    offset + i) keeps keys within window // 2 on either side, or, causal, the window - 1 before it and itself."""
    offset = key_length - query_length
    query = torch.arange(offset, key_length, device=device)[:, None]
    key = torch.arange(key_length, device=device)[None, :]
    distance = query - key  # (T_query, T_key)
    band = (distance >= 0) & (distance < window) if causal else distance.abs() <= window // 2
    if mask is None:
        mask = torch.ones(query_length, key_length, dtype=torch.bool, device=device)
        if is_causal:
            mask = mask.tril(offset)
    return mask & band


class Transformer(nn.Module):
    """The backbone: `forward(input_ids, ...)` returns the last hidden states (B, T, H)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        attention_groups = config.layer_groups(shared=config.sharing in ("all", "attention"))
        ffn_groups = config.layer_groups(shared=config.sharing in ("all", "ffn"))
        # Sharing = fewer layers, run in a longer order: position i runs attention_layers[attention_groups[i]].
        self.attention_layers = nn.ModuleList(Attention(config) for _ in range(max(attention_groups) + 1))
        if config.norm_position == "pre" and config.embedding_norm and max(attention_groups) > 0:
            # ModernBERT: the embeddings were just normalised; the first layer's attention does not do it again
            self.attention_layers[0].norm = nn.Identity()
        self.ffn_layers = nn.ModuleList(FeedForward(config) for _ in range(max(ffn_groups) + 1))
        self.layer_order = list(zip(attention_groups, ffn_groups, strict=True))
        self.final_norm = norm_module(config, config.hidden_size) \
            if config.norm_position == "pre" else nn.Identity()
        self.apply(partial(init_weights, std=config.initializer_range))
        if config.scaled_residual_init:  # GPT-2: keep the residual stream's variance independent of depth
            std = config.initializer_range / math.sqrt(2 * config.num_layers)
            for layer in self.attention_layers:
                nn.init.normal_(layer.out.weight, std=std)
            for layer in self.ffn_layers:
                nn.init.normal_(layer.down.weight, std=std)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        document_ids: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """input_ids (B, T); attention_mask (B, T) 1 = real token, 0 = padding; token_type_ids (B, T) segments;
        position_ids (B, T), default 0..T-1; document_ids (B, T) for packed sequences. Returns (B, T, H).

        With a `cache` (causal models: generation), input_ids are the new tokens after the cached ones, positions
        default to continue from them, and attention_mask covers the cached and the new tokens (B, T_cached + T).
        """
        B, T = input_ids.shape
        past = 0 if cache is None else cache.length
        if past + T > self.config.max_position_embeddings and self.config.position_embedding != "rotary":
            raise ValueError(
                f"sequence length {past + T} exceeds max_position_embeddings={self.config.max_position_embeddings}"
            )
        if cache is not None and (document_ids is not None or not self.config.causal):
            raise ValueError("a KV cache is for causal models without document_ids")
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        any_local = any(self.config.is_local(layer) for layer in range(len(self.layer_order)))
        if self.config.attention_masks == "blocks" and cache is None:  # nothing (T x T): models/block_attention.py
            groups = token_groups(attention_mask, document_ids, B, T, input_ids.device)
            mask, is_causal = (None if groups is None else GroupedRows(groups)), self.config.causal
            local = Band(groups, self.config.local_attention_window, self.config.causal) if any_local else None
        else:
            mask, is_causal = attention_mask_for(attention_mask, document_ids, self.config.causal, T, past + T,
                                                 input_ids.device)
            local = None
            if any_local:
                local = local_mask(mask, is_causal, self.config.local_attention_window, self.config.causal, T,
                                   past + T, input_ids.device)
        rotary = local_rotary = None
        if self.config.position_embedding == "rotary":
            rotary = local_rotary = rotary_angles(position_ids, self.config.head_size, self.config.rotary_base)
            if local is not None and self.config.local_rotary_base not in (None, self.config.rotary_base):
                local_rotary = rotary_angles(position_ids, self.config.head_size, self.config.local_rotary_base)
        x = self.embeddings(input_ids, token_type_ids, position_ids)  # (B, T, H)
        checkpointed = (self.config.activation_checkpointing == "blocks" and self.training and cache is None
                        and torch.is_grad_enabled())
        for position in range(len(self.layer_order)):
            layer_mask, layer_causal, layer_rotary = (local, False, local_rotary) if self.config.is_local(position) \
                else (mask, is_causal, rotary)
            if checkpointed and position % self.config.checkpoint_every == 0:
                x = checkpoint(self.layer, position, x, layer_mask, layer_causal, layer_rotary, use_reentrant=False)
            else:
                x = self.layer(position, x, layer_mask, layer_causal, layer_rotary, cache)
        return self.final_norm(x)

    def layer(self, position: int, x: Tensor, mask: Tensor | GroupedRows | Band | None, is_causal: bool,
              rotary: tuple[Tensor, Tensor] | None, cache: KVCache | None = None) -> Tensor:
        """The `position`-th layer of the run order: attention, then feed-forward (shared ones as they are shared)."""
        attention_index, ffn_index = self.layer_order[position]
        x = self.attention_layers[attention_index](x, mask=mask, is_causal=is_causal, rotary=rotary, cache=cache,
                                                   position=position)
        return self.ffn_layers[ffn_index](x)

    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_layers)

    def resize_vocabulary(self, vocab_size: int) -> None:
        """Grow the token embeddings to `vocab_size` rows, the new ones initialised as at the start (for tokens
        added to the tokenizer); heads tied to the embeddings must be tied again (`ModelWithHeads`)."""
        old = self.embeddings.word
        if vocab_size < old.num_embeddings:
            raise ValueError(f"the vocabulary can only grow: {vocab_size} < {old.num_embeddings}")
        word = nn.Embedding(vocab_size, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
        init_weights(word, self.config.initializer_range)
        with torch.no_grad():
            word.weight[: old.num_embeddings] = old.weight
        self.embeddings.word = word
        self.config = dataclasses.replace(self.config, vocab_size=vocab_size)

    def num_parameters(self) -> int:
        """Distinct parameters (shared and tied ones counted once)."""
        return sum(p.numel() for p in self.parameters())
