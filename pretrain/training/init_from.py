"""Continued pretraining: a run that starts from a model that already exists (`model.init_from`), a Hugging Face
directory of any family `pretrain.load` reads, a directory written by `pretrain export`, or a checkpoint of this
project (a new run from its weights: resuming one stays `--ckpt_path`). The architecture comes from the source; the
backbone's weights and every objective head the source has are loaded; what is new and what is not used is said."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer
from torch import nn

from models import LMHead, ModelWithHeads, TransformerConfig
from pretrain.errors import UserError

if TYPE_CHECKING:
    from pretrain.downstream.pretrained import Pretrained

# Fields a run may set otherwise than its source: they change training, not the weights' meaning.
TRAINING_FIELDS = ("dropout", "attention_dropout")


def load_source(path: str | Path) -> Pretrained:
    from pretrain.downstream.pretrained import load

    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise UserError(f"model.init_from {path} does not exist: give a Hugging Face model directory, a directory "
                        "written by pretrain export, or a checkpoint of pretrain fit")
    try:
        return load(path)
    except UserError as error:
        raise UserError(f"model.init_from {path}: {error}") from None


def source_architecture(source: TransformerConfig, recipe: TransformerConfig | None, path: str) -> TransformerConfig:
    """The backbone of a continued run: the source's. A recipe that also gives one must agree with it (the fields
    that only change training, dropout, are taken from the recipe)."""
    if recipe is None:
        return source
    differ = [f"{field.name} {getattr(recipe, field.name)!r} (the source's: {getattr(source, field.name)!r})"
              for field in dataclasses.fields(TransformerConfig)
              if field.name not in TRAINING_FIELDS and getattr(recipe, field.name) != getattr(source, field.name)]
    if differ:
        raise UserError(f"model.backbone contradicts model.init_from {path}: " + "; ".join(differ)
                        + ". Leave model.backbone out (the architecture comes from the source)")
    return dataclasses.replace(source, **{name: getattr(recipe, name) for name in TRAINING_FIELDS})


def same_shapes(ours: nn.Module, theirs: nn.Module) -> bool:
    mine, other = ours.state_dict(), theirs.state_dict()
    return mine.keys() == other.keys() and all(mine[k].shape == other[k].shape for k in mine)


def load_weights(backbone: nn.Module, heads: dict[str, nn.Module], source: Pretrained, path: str) -> list[str]:
    """Copy the source's backbone (every weight) and each head of ours the source has under the same name and kind
    into our modules. Returns the report: what was loaded, what is new, what of the source is not used."""
    backbone.load_state_dict(source.model.backbone.state_dict())
    theirs = dict(source.model.heads.items())
    loaded, new = [], []
    for name, head in heads.items():
        match = theirs.get(name)
        if match is not None and type(match) is type(head) and same_shapes(head, match):
            head.load_state_dict(match.state_dict())
            loaded.append(name)
        else:
            new.append(name)
    unused = [name for name in theirs if name not in loaded]
    count = sum(p.numel() for p in backbone.parameters())
    lines = [f"init_from {path}: the backbone ({count:,} parameters"
             + (f"), heads {', '.join(loaded)}" if loaded else ")") + " loaded"]
    if new:
        lines.append(f"  new (fresh weights): heads {', '.join(new)} (the source has none of this kind and shape)")
    if unused:
        lines.append(f"  not used: the source's heads {', '.join(unused)} (no objective of this run trains them)")
    lines.append("  optimizer: new (the source has none); the schedule is this run's (warm-up, then decay)")
    return lines


def tokenizer_fits(tokenizer: Tokenizer, source: Tokenizer, path: str, init_from: str) -> None:
    """The run's tokenizer must be the source's, with at most tokens added after its own (`data.add_tokens`): every
    token of the source keeps its id."""
    theirs = source.get_vocab()
    if tokenizer.get_vocab_size() < len(theirs) or any(tokenizer.token_to_id(t) != i for t, i in theirs.items()):
        raise UserError(f"data.tokenizer {path} is not the tokenizer of model.init_from {init_from}: the source's "
                        "embeddings belong to its own; leave data.tokenizer out to use it (data.add_tokens adds "
                        "domain tokens to it)")


def grow_vocabulary(model: ModelWithHeads, size: int) -> None:
    """New embedding rows (and rows of an untied output matrix) for tokens added to the source's tokenizer, each
    the mean of the existing rows (the usual practice: a new token starts as an average token); output biases 0."""
    old = model.config.vocab_size
    if size <= old:
        return
    model.resize_vocabulary(size)
    with torch.no_grad():
        rows = model.backbone.embeddings.word.weight
        rows[old:] = rows[:old].mean(0)
        for head in model.heads.values():
            if isinstance(head, LMHead) and not head.tied:
                head.weight[old:] = head.weight[:old].mean(0)
