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
TRAINING_FIELDS = ("dropout", "attention_dropout", "activation_checkpointing", "checkpoint_every", "attention_masks")


def load_source(path: str | Path | None, option: str = "model.init_from") -> Pretrained:
    from pretrain.downstream.pretrained import load

    if path is None:
        raise UserError(f"{option} is missing")
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise UserError(f"{option} {path} does not exist: give a Hugging Face model directory, a directory "
                        "written by pretrain export, or a checkpoint of pretrain fit")
    try:
        return load(path)
    except UserError as error:
        raise UserError(f"{option} {path}: {error}") from None


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


def tokenizer_fits(tokenizer: Tokenizer, source: Tokenizer, path: str, init_from: str,
                   option: str = "model.init_from") -> None:
    """The run's tokenizer must be the source's, with at most tokens added after its own (`data.add_tokens`): every
    token of the source keeps its id."""
    theirs = source.get_vocab()
    if tokenizer.get_vocab_size() < len(theirs) or any(tokenizer.token_to_id(t) != i for t, i in theirs.items()):
        raise UserError(f"data.tokenizer {path} is not the tokenizer of {option} {init_from}: the source's "
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


def generator_path(init_from: str | None, init_generator_from: str | None, electra: bool) -> str | None:
    """Where an ELECTRA run's generator comes from: `model.init_generator_from`, or the directory that Google's and
    Hugging Face's releases put beside the discriminator (electra-small-discriminator, electra-small-generator)."""
    if init_generator_from is not None:
        if not electra:
            raise UserError("model.init_generator_from is ELECTRA's generator: this recipe has no "
                            "ReplacedTokenDetection objective; leave it out")
        if init_from is None:
            raise UserError("model.init_generator_from needs model.init_from (the discriminator the generator serves)")
        return init_generator_from
    if init_from is None or not electra:
        return None
    path = Path(init_from)
    beside = path.with_name(path.name.replace("discriminator", "generator"))
    return str(beside) if "discriminator" in path.name and beside.is_dir() else None


def generator_size(source: TransformerConfig, discriminator: TransformerConfig, asked: float | None,
                   path: str) -> float:
    """The generator size (a share of the discriminator's width) that rebuilds the source's generator; a recipe's
    `generator_size` must agree with it."""
    from objectives.rtd import generator_config

    size = source.hidden_size / discriminator.hidden_size
    built = generator_config(discriminator, size)
    differ = [f"{field.name} {getattr(source, field.name)!r} (a generator of this discriminator: "
              f"{getattr(built, field.name)!r})" for field in dataclasses.fields(TransformerConfig)
              if field.name not in TRAINING_FIELDS and getattr(source, field.name) != getattr(built, field.name)]
    if differ:
        raise UserError(f"model.init_generator_from {path} is not a generator of the discriminator: "
                        + "; ".join(differ))
    if asked is not None and generator_config(discriminator, asked) != generator_config(discriminator, size):
        raise UserError(f"ReplacedTokenDetection's generator_size {asked} contradicts model.init_generator_from "
                        f"{path} (a generator {size:.4g} of the discriminator's width): leave generator_size out")
    return size


def load_generator(generator: nn.Module, head: LMHead, source: Pretrained, path: str) -> list[str]:
    """ELECTRA's generator from its own source (ElectraForMaskedLM): its layers, its projection to its width and its
    MLM head. Its embedding tables and LayerNorm are the discriminator's (ELECTRA shares them): the source's own
    copies are compared, not loaded, and said where they differ."""
    ours, theirs = generator.state_dict(), source.model.backbone.state_dict()
    shared = [key for key in ours if key.startswith("embeddings.") and not key.startswith("embeddings.projection.")]
    generator.load_state_dict({key: ours[key] if key in shared else theirs[key] for key in ours})
    lines = [f"init_generator_from {path}: the generator ({sum(p.numel() for p in generator.parameters()):,} "
             "parameters, the discriminator's embeddings among them, as ELECTRA shares them)"]
    match = source.model.heads["mlm"] if "mlm" in source.model.heads else None
    if match is not None and type(match) is type(head) and same_shapes(head, match):
        state = match.state_dict()
        if head.tied:  # the shared embeddings: the discriminator's, already in place
            state["weight"] = head.weight
        head.load_state_dict(state)
        lines[0] += ", its head mlm loaded"
    else:
        lines[0] += " loaded"
        lines.append("  new (fresh weights): the generator's head mlm (the source has none of this kind and shape)")
    unused = [name for name in source.model.heads if name != "mlm" or not lines[0].endswith("head mlm loaded")]
    if unused:
        lines.append(f"  not used: the generator source's heads {', '.join(unused)} (the generator is trained by MLM)")
    differ = [key for key in shared if not torch.equal(ours[key], theirs[key])]
    if differ:
        lines.append(f"  not used: the generator source's own {', '.join(differ)} (they differ from the "
                     "discriminator's, which both networks use)")
    return lines
