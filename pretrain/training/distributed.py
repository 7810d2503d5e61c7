"""Fully sharded data parallelism (FSDP) for `pretrain fit`.

`--trainer.strategy fsdp`: weights, gradients and optimizer state are sharded across the processes; a checkpoint is
one full file, gathered on rank 0 (what every reader of this project takes, with its checksums). `fsdp_sharded`:
each process writes its own shard into a checkpoint directory (`torch.distributed.checkpoint`), for models whose
full state does not fit one host's memory; `pretrain.load`, `pretrain export` and `--ckpt_path last` read it too.

Both wrap every attention block and every feed-forward block in its own FSDP unit, so that only one block's full
weights are gathered at a time. Blocks that run more than once per forward (ALBERT's cross-layer sharing) stay in
the root unit with the embeddings and the heads, as do weights tied between modules (embeddings and LM heads).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from pytorch_lightning.strategies import FSDPStrategy, Strategy
from torch import nn

from models.transformer import Attention, FeedForward, Transformer

STATE_DICT_TYPES = {"fsdp": "full", "fsdp_sharded": "sharded"}


def blocks_to_wrap(model: nn.Module) -> set[int]:
    """The ids of the attention and feed-forward blocks of every backbone in `model` (an ELECTRA generator's too)
    that run once per forward."""
    ids: set[int] = set()
    for backbone in (m for m in model.modules() if isinstance(m, Transformer)):
        attention = Counter(index for index, _ in backbone.layer_order)
        ffn = Counter(index for _, index in backbone.layer_order)
        ids |= {id(block) for index, block in enumerate(backbone.attention_layers) if attention[index] == 1}
        ids |= {id(block) for index, block in enumerate(backbone.ffn_layers) if ffn[index] == 1}
    return ids


class BlockWrapPolicy:
    """FSDP's auto-wrap policy (the callable form): one unit per block in `ids` (`blocks_to_wrap`)."""

    def __init__(self, ids: set[int]):
        self.ids = ids

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        return recurse or (isinstance(module, (Attention, FeedForward)) and id(module) in self.ids)


def fsdp_strategy(name: Any, model: nn.Module) -> FSDPStrategy | None:
    """The strategy `--trainer.strategy NAME` means for `model`, where NAME is one of ours (`STATE_DICT_TYPES`);
    None for anything else (Lightning's own names, a strategy object, nothing)."""
    if not isinstance(name, str) or name not in STATE_DICT_TYPES:
        return None
    return FSDPStrategy(auto_wrap_policy=BlockWrapPolicy(blocks_to_wrap(model)),
                        state_dict_type=STATE_DICT_TYPES[name])


def writes_sharded(strategy: Strategy) -> bool:
    """Whether `strategy` writes checkpoints as directories of shards (FSDP's "sharded" state dict type). Reads
    FSDPStrategy's private `_state_dict_type` (also set when a recipe builds the strategy itself): if Lightning
    renames it, tests/pretrain/training/test_sharded.py fails."""
    return isinstance(strategy, FSDPStrategy) and getattr(strategy, "_state_dict_type", "full") == "sharded"
