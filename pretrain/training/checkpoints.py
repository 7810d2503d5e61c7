"""Lightning checkpoints that a fault cannot destroy, and reading them back safely.

Writing: next to the target (same directory, so the rename never crosses filesystems), fsync, atomic rename; a
failed write (a full disk) leaves the previous file as it was and stops the run with one line. The newest is always
`last.ckpt`; the last `keep` are also kept as `step-NNNNNNNN.ckpt`. No checkpoint is written from non-finite weights,
nor while the run is skipping steps with non-finite gradients. Reading: the archive's CRC-32 checksums are verified
and tensors are unpickled with `weights_only=True` (no code runs), whatever the caller asks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.plugins.io import CheckpointIO

from pretrain.errors import UserError

LAST = "last.ckpt"
_VERIFIED: set[tuple[str, int, int]] = set()  # (path, size, mtime) of files whose checksums were verified


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (full disk, permissions): the previous one is intact."""


class UnsafeWeightsError(UserError):
    """The weights are not finite: nothing is written from them."""


# --- writing --------------------------------------------------------------------------------------------------

def mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def write_atomically(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write `path` through `write(file)` into a temporary file beside it, fsync it, rename it over `path`, fsync the
    directory: `path` holds the old content or the new, never a part. On failure the temporary file is removed and
    a `CheckpointWriteError` names the path, the reason and the disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
        fsync_directory(path.parent)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        cause = os_error_in(error)
        if cause is not None:  # torch.save reports a failed write as a RuntimeError raised while handling it
            raise CheckpointWriteError(write_failure(path, cause)) from error
        raise


def os_error_in(error: BaseException | None) -> OSError | None:
    """The OSError in an exception's chain (itself, its cause or its context), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def write_failure(path: Path, error: OSError) -> str:
    disk = mount_point(path.parent)
    try:
        free = f", {shutil.disk_usage(disk).free / 2**20:,.1f} MiB free"
    except OSError:
        free = ""
    return (f"could not write {path}: {error.strerror or error} (disk {disk}{free}); the previous checkpoint is "
            "intact. Free space (or set --trainer.default_root_dir on another disk), then resume with --ckpt_path last")


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (a crash right after it must not bring the old name back)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:  # not every platform opens directories
        return
    try:
        with contextlib.suppress(OSError):  # some filesystems refuse to fsync a directory: the rename still stands
            os.fsync(descriptor)
    finally:
        os.close(descriptor)


def link_or_copy(source: Path, target: Path) -> None:
    """`target` becomes the same file as `source`, atomically: a hard link (no second write) where the filesystem
    has them, else a copy."""
    temporary = target.with_name(f".{target.name}.partial-{os.getpid()}")
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError:
        with open(source, "rb") as file:
            write_atomically(target, lambda out: shutil.copyfileobj(file, out, 2**24))
        return
    os.replace(temporary, target)
    fsync_directory(target.parent)


# --- reading --------------------------------------------------------------------------------------------------

def check_checkpoint_file(path: Path) -> None:
    """A clear error for a checkpoint path that is missing, or a file that is not a whole, undamaged checkpoint: every
    entry of the archive is read and checked against its CRC-32 (flipped bytes inside a tensor are caught here;
    `torch.load` alone would return the damaged values)."""
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist (to resume the run in --trainer.default_root_dir, give "
                        "--ckpt_path last)")
    earlier = f"use an earlier one ({path.parent}/step-*.ckpt) or a complete copy"
    stat = path.stat()
    identity = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if identity in _VERIFIED:
        return
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not a readable checkpoint (truncated or corrupt?): {earlier}")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise UserError(f"{path} is not a readable checkpoint ({error}): {earlier}") from error
    if damaged is not None:
        raise UserError(f"{path} is damaged: its entry {damaged} fails its checksum; {earlier}")
    _VERIFIED.add(identity)


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """A Lightning checkpoint's contents (on the CPU by default), after checking its checksums, never unpickling
    code (`weights_only=True`)."""
    path = Path(path)
    check_checkpoint_file(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # objects that weights_only refuses to unpickle, or a damaged record
        raise UserError(f"{path} could not be read as a checkpoint ({type(error).__name__}: "
                        f"{str(error).splitlines()[0][:200] if str(error) else ''}); it may not come from "
                        "pretrain fit, or it holds objects other than tensors and plain data") from error


class SafeCheckpointIO(CheckpointIO):
    """Lightning's checkpoint reader and writer for `pretrain fit`: atomic writes beside the target (see
    `write_atomically`), verified reads with `weights_only=True` only."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        write_atomically(path, lambda file: torch.save(checkpoint, file))

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None
                        ) -> dict[str, Any]:
        if weights_only is False:
            raise UserError("weights_only false would let a checkpoint run code as it is loaded; pretrain loads "
                            "checkpoints with weights_only=True only: drop the option")
        return read_checkpoint(path, map_location)

    def remove_checkpoint(self, path) -> None:
        Path(path).unlink(missing_ok=True)


# --- the callback ---------------------------------------------------------------------------------------------

def finite_weights(module: torch.nn.Module) -> bool:
    """Whether every floating-point parameter and buffer is finite (one host sync)."""
    checks = [tensor.isfinite().all() for tensor in module.state_dict().values()
              if torch.is_tensor(tensor) and tensor.is_floating_point()]
    return bool(torch.stack(checks).all()) if checks else True


class Checkpoints(Callback):
    """Writes the run's checkpoints into `dirpath` (default: RUN/checkpoints): `last.ckpt` every
    `every_n_train_steps` steps and when training ends, and the last `keep` of them also as `step-NNNNNNNN.ckpt`
    (hard links: one write each), so that one bad save or one bad step never leaves a run with nothing. Older step
    checkpoints are removed once a newer one is safely on disk. `last.ckpt` is always the newest, also in a run
    directory that was moved or copied.

    Refuses (stopping the run with one line) to write from non-finite weights; while the module reports steps being
    skipped for non-finite gradients (`PretrainingModule.skipping`), saving waits for a good step.
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 1000, keep: int = 2):
        if every_n_train_steps < 1:
            raise UserError(f"checkpoint.every_n_train_steps must be at least 1, got {every_n_train_steps}")
        if keep < 0:
            raise UserError(f"checkpoint.keep must be 0 or more, got {keep}")
        self.dirpath = Path(dirpath) if dirpath else None
        self.every_n_train_steps, self.keep = every_n_train_steps, keep
        self._saved_step: int | None = None
        self.postponed = 0  # saves put off while steps were being skipped

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = Path(trainer.default_root_dir) / "checkpoints"
        if trainer.is_global_zero and self.dirpath.is_dir():  # temporary files of a save that was killed
            for stale in self.dirpath.glob(".*.ckpt.partial-*"):
                stale.unlink(missing_ok=True)

    @property
    def last(self) -> Path:
        return self.dirpath / LAST

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_train_steps == 0 or 0 <= trainer.max_steps <= step:
            self.save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.save(trainer, pl_module)

    def save(self, trainer, pl_module) -> None:
        step = trainer.global_step
        if step == 0 or step == self._saved_step or trainer.sanity_checking or trainer.fast_dev_run:
            return
        from pretrain.training.module import PretrainingModule

        if isinstance(pl_module, PretrainingModule) and pl_module.skipping():
            self.postponed += 1
            return
        if not finite_weights(pl_module):
            raise UnsafeWeightsError(
                f"the weights are not finite at step {step}: no checkpoint was written from them; the newest good one "
                f"is {self.last}. Lower the learning rate or clip gradients (--trainer.gradient_clip_val 1.0), then "
                "resume from it with --ckpt_path last")
        target = self.dirpath / f"step-{step:08d}.ckpt" if self.keep else self.last
        trainer.save_checkpoint(target, weights_only=False)  # the whole state: exact resume
        self._saved_step = step
        if self.keep and trainer.is_global_zero:
            link_or_copy(target, self.last)
            self.prune()

    def prune(self) -> None:
        """Remove all but the newest `keep` step checkpoints (by the time they were written)."""
        stamped = sorted(self.dirpath.glob("step-*.ckpt"), key=lambda p: (p.stat().st_mtime_ns, p.name))
        for old in stamped[:-self.keep]:
            old.unlink(missing_ok=True)
