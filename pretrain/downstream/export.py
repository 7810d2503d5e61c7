"""`pretrain export`: a checkpoint's model and tokenizer as a portable directory (or a Hugging Face one)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from pretrain.downstream.pretrained import load
from pretrain.errors import UserError


def check_new_directory(out: Path) -> None:
    """Output directories of the commands (export, fine-tuning) must be new or empty: nothing is ever overwritten."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty: choose a new directory")


def export(checkpoint: str | Path, out: str | Path, format: str = "native", family: str | None = None) -> Path:
    """Write `checkpoint`'s model and tokenizer to the new directory `out` ("native" for `pretrain.load`, "hf" for
    transformers). Written to a temporary directory first: `out` appears complete or not at all."""
    out = Path(out)
    check_new_directory(out)
    if format not in ("native", "hf"):
        raise UserError(f"unknown format {format!r}: native or hf")
    pretrained = load(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pretrained.save(staging) if format == "native" else pretrained.save_hf(staging, family)
        mask = os.umask(0)
        os.umask(mask)
        staging.chmod(0o777 & ~mask)  # mkdtemp makes it 0700: the directory gets the mode mkdir would give it
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except ValueError as error:  # a variant without a Hugging Face equivalent: the message names the field
        raise UserError(f"cannot export to Hugging Face: {error}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
