"""Resuming `pretrain fit`: which checkpoint `--ckpt_path` means, whether it can be trusted, and what the recipe of
this run changes against the checkpoint's (the architecture may not change; the rest is applied and said)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from pretrain.errors import UserError
from pretrain.training.checkpoints import LAST, check_checkpoint_file, contents_file
from pretrain.training.module import COMPUTE_FIELDS, OPTIMIZER_SETTINGS

# Recipe keys whose change a resumed run refuses (the weights and the optimizer state would not fit), and sections
# whose changes are applied and said; anything else (trainer, checkpoint, ckpt_path, ...) changes silently.
REFUSED = ("model.backbone.", "model.objectives", "model.optimizer")
SAID = ("model.", "data.", "seed_everything")
QUIET = ("model.tokenizer", "model.compile", "data.tokenizer", "data.num_workers", "data.num_proc", "data.cache_dir")


def resolve(ckpt_path: str | None, checkpoints: Path) -> Path | None:
    """The checkpoint a resume reads: `last` is `checkpoints`/last.ckpt (None where there is none yet: the run starts
    fresh, so one command both starts and restarts a run); another value is a path. Either is verified (see
    `check_checkpoint_file`). With no `ckpt_path`, refuses to start a new run over an earlier run's checkpoints."""
    if ckpt_path is None:
        if checkpoints.is_dir() and any(checkpoints.glob("*.ckpt")):
            raise UserError(f"{checkpoints} already holds checkpoints of an earlier run: resume it with --ckpt_path "
                            "last, or start a new run elsewhere with --trainer.default_root_dir")
        return None
    if ckpt_path == "last":
        path = checkpoints / LAST
        if not path.exists() and not path.is_symlink():  # (a link to nothing is refused below, not ignored)
            print(f"note: no {LAST} in {checkpoints} yet: starting the run from the beginning", flush=True)
            return None
    elif ckpt_path in ("best", "hpc", "registry"):
        raise UserError(f"--ckpt_path {ckpt_path} is not supported by pretrain fit: give last, or a checkpoint file")
    else:
        path = Path(ckpt_path)
    check_checkpoint_file(path)
    return path


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"model.backbone.hidden_size": 64, ...}; lists stay whole values (an objective list is one setting)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out |= flatten(value, f"{prefix}{key}.")
        return out
    return {prefix[:-1]: tree}


def recipe_changes(saved_recipe: str, current: dict) -> tuple[list[str], list[str]]:
    """(refused, said): one line per setting whose value in `current` (the resolved recipe of this run, as a
    dict) differs from `saved_recipe` (the YAML the checkpoint carries)."""
    before = flatten(yaml.safe_load(saved_recipe) or {})
    after = flatten(json.loads(json.dumps(current, default=str)))
    refused, said = [], []
    for key in sorted(before.keys() | after.keys()):
        old, new = before.get(key), after.get(key)
        if _same(old, new) or key.startswith(QUIET) or key.removeprefix("model.") in OPTIMIZER_SETTINGS:
            continue  # (optimizer settings: the module applies them to the restored optimizer and says so)
        line = f"{key}: {old!r} in the checkpoint, {new!r} now"
        if key.removeprefix("model.backbone.") in COMPUTE_FIELDS:  # how the backbone computes, not what: applied
            said.append(line)
        elif key.startswith(REFUSED):
            refused.append(line)
        elif key.startswith(SAID):
            said.append(line)
    return refused, said


def _same(old: Any, new: Any) -> bool:
    return json.dumps(old, sort_keys=True, default=str) == json.dumps(new, sort_keys=True, default=str)


def saved_recipe(path: Path) -> str | None:
    """The resolved recipe a checkpoint of `pretrain fit` carries (its tensors are memory-mapped, not read; of a
    sharded checkpoint directory, its meta.pt is read)."""
    import torch

    try:
        return torch.load(contents_file(path), map_location="cpu", weights_only=True, mmap=True).get("config")
    except Exception as error:
        raise UserError(f"{path} could not be read as a checkpoint ({type(error).__name__}); it may not come from "
                        "pretrain fit") from error


def check_recipe(saved_recipe: str | None, current: dict, path: Path) -> list[str]:
    """Refuse a resume that changes the architecture, objectives or optimizer (all refused lines at once); print a
    line for every other model, data or seed setting that changed (they apply; optimizer settings are applied to the
    restored optimizer by the module, which says so). Returns the changed data settings: with them the training
    data starts from its beginning (the saved position belongs to other data: a second phase at another length)."""
    if not saved_recipe:
        return []
    refused, said = recipe_changes(saved_recipe, current)
    if refused:
        raise UserError(f"cannot resume from {path}: " + "; ".join(refused) + ". A resumed run keeps its architecture, "
                        "objectives and optimizer: drop the override, or start a new run in another "
                        "--trainer.default_root_dir")
    for line in said:
        print(f"note: resuming with a changed setting: {line}", flush=True)
    return [line.split(":")[0] for line in said if line.startswith("data.")]
