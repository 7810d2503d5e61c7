"""Checks that need only the recipe (and a look at the files it names), run by `pretrain fit` before anything is
built: before a tokenizer is trained, an examples cache is built or a run directory is made. Every problem found is
said at once, each with its fix; a refused run leaves nothing behind."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from pretrain.errors import UserError


def value(section: Any, key: str, default: Any = None) -> Any:
    """`section[key]` for a jsonargparse Namespace or a dict (None-safe)."""
    if section is None:
        return default
    getter = section.get if hasattr(section, "get") else lambda k, d: getattr(section, k, d)
    found = getter(key, default)
    return default if found is None else found


def schedule_problems(model: Any, trainer: Any) -> list[str]:
    """A warm-up that does not end before the decay's end (the steps known from the recipe alone)."""
    if value(model, "schedule", "linear") not in ("linear", "cosine") or value(model, "warmup_ratio") is not None:
        return []
    warmup = value(model, "warmup_steps", 10_000)
    total, source = value(model, "total_steps"), "model.total_steps"
    if total is None and value(trainer, "max_steps", -1) > 0:
        total, source = value(trainer, "max_steps"), "trainer.max_steps"
    if total is None or warmup < total:
        return []
    return [f"model.warmup_steps {warmup:,} is not below the run's {total:,} steps ({source}): the "
            f"{value(model, 'schedule', 'linear')} decay would have no steps left; set --model.warmup_steps "
            f"{max(1, total // 10)} or --model.warmup_ratio 0.1 (a share of the run)"]


def objectives_of(model: Any) -> list:
    """The recipe's objectives, built (they are small: their heads are made later, with the backbone)."""
    built = []
    for entry in value(model, "objectives", []) or []:
        path = value(entry, "class_path")
        if not isinstance(path, str):
            return []  # already built (a Python caller) or not a class path: checked where it is built
        module, _, name = path.rpartition(".")
        arguments = value(entry, "init_args", {})
        arguments = dict(arguments.items()) if hasattr(arguments, "items") else dict(vars(arguments))
        built.append(getattr(importlib.import_module(module), name)(**arguments))
    return built


def length_problem(max_length: int | None, positions: int | None, position_embedding: str) -> list[str]:
    """Examples longer than the learned positions (one line, or none). Also `PretrainingModule.check_data`'s."""
    if position_embedding != "learned" or not max_length or not positions or max_length <= positions:
        return []
    return [f"data.max_length {max_length} is longer than the model's {positions} positions: set --data.max_length "
            f"{positions} or raise model.backbone.max_position_embeddings"]


def data_problems(model: Any, data: Any) -> list[str]:
    """The objectives against the data layout, the data's length against the positions, the tokenizer (to be
    trained, or found) against the model's vocabulary, and the corpus files."""
    from objectives.base import data_mismatches
    from pretrain.data.corpus import resolve_files
    from pretrain.data.tokenizer import load_tokenizer

    problems = []
    settings = {key: value(data, key) for key in ("layout", "pair_task", "word_starts", "cls_first", "max_length")}
    defaults = {"layout": "stream", "pair_task": "nsp", "word_starts": False, "cls_first": True, "max_length": 128}
    settings = {key: defaults[key] if found is None else found for key, found in settings.items()}
    try:
        problems += data_mismatches(objectives_of(model), settings)
    except (TypeError, ValueError, UserError):
        pass  # an objective refuses its own arguments: said, as before, where it is built
    backbone = value(model, "backbone")
    positions, vocab_size = value(backbone, "max_position_embeddings"), value(backbone, "vocab_size")
    problems += length_problem(settings["max_length"], positions, value(backbone, "position_embedding", "learned"))
    tokenizer = value(data, "tokenizer")
    if tokenizer and vocab_size:
        if Path(tokenizer).exists():
            size, what = load_tokenizer(tokenizer).get_vocab_size(), f"the tokenizer {tokenizer} has"
        elif value(data, "train_tokenizer"):
            size, what = value(data, "tokenizer_vocab_size", 8000), "the tokenizer to be trained would have up to"
        else:
            size, what = None, ""
            problems.append(f"tokenizer not found: {tokenizer}; give an existing one, or --data.train_tokenizer "
                            "wordpiece|bpe|unigram to train it there")
        if size and size > vocab_size:
            problems.append(f"{what} {size:,} tokens but the model's vocab_size is {vocab_size:,}: set "
                            f"--model.backbone.vocab_size {size} or --data.tokenizer_vocab_size {vocab_size}")
    for key in ("files", "validation_files"):
        if value(data, key):
            try:
                resolve_files(value(data, key))
            except UserError as error:
                problems.append(f"data.{key}: {error}")
    return problems


def source_problems(model: Any, data: Any) -> list[str]:
    """What a run needs from the recipe or from a source model (`model.init_from`): an architecture, a tokenizer."""
    if value(model, "init_from"):
        return []
    problems = []
    if value(model, "backbone") is None:
        problems.append("model.backbone is missing: give the architecture (see configs/), or model.init_from to "
                        "continue a model that exists (a Hugging Face directory, an export or a checkpoint)")
    if not value(data, "tokenizer"):
        problems.append("data.tokenizer is missing: give a tokenizer (with data.train_tokenizer to train it there), "
                        "or model.init_from to continue a model with its own")
    return problems


def check_recipe_first(config: Any) -> None:
    """Every problem the recipe shows before anything is built, as one error (nothing is written)."""
    problems = source_problems(value(config, "model"), value(config, "data"))
    problems += schedule_problems(value(config, "model"), value(config, "trainer"))
    problems += data_problems(value(config, "model"), value(config, "data"))
    run_dir = value(value(config, "trainer"), "default_root_dir")
    if run_dir and Path(run_dir).exists() and not Path(run_dir).is_dir():
        problems.append(f"trainer.default_root_dir {run_dir} is a file: give a directory for the run")
    if problems:
        raise UserError("; ".join(problems) if len(problems) == 1 else
                        "the recipe cannot run:\n" + "\n".join(f"  - {problem}" for problem in problems))
