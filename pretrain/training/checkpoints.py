"""Lightning checkpoints that a fault cannot destroy, and reading them back safely.

Writing: next to the target (same directory, so the rename never crosses filesystems), fsync, atomic rename; a
failed write (a full disk) leaves the previous file as it was and stops the run with one line. The newest is always
`last.ckpt`; the last `keep` are also kept as `step-NNNNNNNN.ckpt`. No checkpoint is written from non-finite weights,
nor while the run is skipping steps with non-finite gradients. Reading: the archive's CRC-32 checksums are verified
and tensors are unpickled with `weights_only=True` (no code runs), whatever the caller asks.

Sharded checkpoints (`--trainer.strategy fsdp_sharded`) are directories: each rank's shards in
`torch.distributed.checkpoint`'s format, its index `.metadata`, and Lightning's `meta.pt` (everything but weights and
optimizer state). They are written into a staging directory and renamed `step-NNNNNNNN.ckpt` once whole; `last.ckpt`
is then a relative symbolic link to the newest. Reading one checks that every shard the index names is on disk at
its full length, reads the index with an unpickler that builds only its own record classes, and the non-tensor
entries and `meta.pt` with `weights_only=True`.
"""

from __future__ import annotations

import enum
import io
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.plugins.io import CheckpointIO
from torch import Tensor

from pretrain.data.cache import sync_directory
from pretrain.errors import UserError

LAST = "last.ckpt"
# Lightning's part of a sharded checkpoint directory (torch.distributed.checkpoint's index is .metadata)
SHARD_METADATA = "meta.pt"
_VERIFIED: set[tuple[str, int, int]] = set()  # (path, size, mtime) of files whose checksums were verified


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (full disk, permissions): the previous one is intact."""


class UnsafeWeightsError(UserError):
    """The weights are not finite: nothing is written from them."""


STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")


def requeue(trainer) -> None:
    """SLURM's warning signal: put the job back in the queue (once, from the first process), as Lightning's
    auto-requeue does; the job's command resumes from the checkpoint just written (`--ckpt_path last`)."""
    if not trainer.is_global_zero:
        return
    job = os.environ["SLURM_JOB_ID"]
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except FileNotFoundError:
        print(f"could not requeue SLURM job {job}: scontrol not found", file=sys.stderr, flush=True)
        return
    print(f"requeued SLURM job {job}" if done.returncode == 0 else
          f"could not requeue SLURM job {job}: {done.stderr.strip()}", file=sys.stderr, flush=True)


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
        sync_directory(path.parent)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        cause = os_error_in(error)
        if cause is not None:  # torch.save reports a failed write as a RuntimeError raised while handling it
            raise CheckpointWriteError(write_failure(path, cause)) from error
        raise


def os_error_in(error: BaseException | None) -> OSError | None:
    """The OSError in an exception's chain (itself, its cause or its context, or a failed rank's of a distributed
    checkpoint), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        failures = getattr(error, "failures", None)  # torch.distributed.checkpoint's: {rank: (error, traceback)}
        for failure in failures.values() if isinstance(failures, dict) else ():
            found = os_error_in(failure[0] if isinstance(failure, tuple) else failure)
            if found is not None:
                return found
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
    sync_directory(target.parent)


def replace_directory(source: Path, target: Path) -> None:
    """Rename the directory `source` to `target`, replacing a `target` that exists (moved aside first, removed
    after)."""
    aside = target.with_name(f".{target.name}.partial-old")
    if target.exists() or target.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(target, aside)
    os.replace(source, target)
    sync_directory(target.parent)
    remove(aside)


def remove(path: Path) -> None:
    """Remove a checkpoint file, link or directory (whatever is there, if anything)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def point_link(link: Path, target: Path) -> None:
    """`link` becomes, atomically, a relative symbolic link to `target` (in the same directory): it follows the run
    directory when it is moved or copied."""
    temporary = link.with_name(f".{link.name}.partial-link")
    temporary.unlink(missing_ok=True)
    os.symlink(target.name, temporary)
    os.replace(temporary, link)
    sync_directory(link.parent)


# --- reading --------------------------------------------------------------------------------------------------

def use_earlier(checkpoint: Path) -> str:
    """What to do instead of reading the damaged `checkpoint`."""
    return f"use an earlier one ({checkpoint.parent}/step-*.ckpt) or a complete copy"


def is_sharded_checkpoint(path: Path) -> bool:
    """Whether `path` is a sharded checkpoint directory (FSDP's sharded state dict type), whole or not."""
    return path.is_dir() and (path / SHARD_METADATA).is_file()


def contents_file(path: Path) -> Path:
    """The file `torch.load` reads of the checkpoint `path`: itself, or a sharded directory's meta.pt (everything
    but its tensors)."""
    return path / SHARD_METADATA if path.is_dir() else path


def check_checkpoint_file(path: Path) -> None:
    """A clear error for a checkpoint path that is missing, or a file that is not a whole, undamaged checkpoint: every
    entry of the archive is read and checked against its CRC-32 (flipped bytes inside a tensor are caught here;
    `torch.load` alone would return the damaged values). A sharded checkpoint directory: see `check_sharded`."""
    if path.is_symlink() and not path.exists():
        raise UserError(f"{path} points to {os.readlink(path)}, which does not exist: {use_earlier(path)}")
    if path.is_dir():
        if not is_sharded_checkpoint(path):
            raise UserError(f"{path} is a directory, not a checkpoint: give a .ckpt file, or a sharded checkpoint "
                            f"directory (one with {SHARD_METADATA})")
        check_sharded(path)
        return
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist (to resume the run in --trainer.default_root_dir, give "
                        "--ckpt_path last)")
    check_archive(path, path)


def check_archive(path: Path, checkpoint: Path) -> None:
    """`path` (the checkpoint itself, or the meta.pt of the sharded `checkpoint`) is a zip archive whose entries all
    match their CRC-32."""
    earlier = use_earlier(checkpoint)
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


class _ShardIndexUnpickler(pickle.Unpickler):
    """Reads torch.distributed.checkpoint's `.metadata` (a plain pickle) building only its record classes, tensor
    sizes, dtypes, layouts and paths: a crafted index cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("builtins", "getattr"):  # how some Python 3.11 releases pickle an enum member
            return _enum_member
        found = super().find_class(module, name) if _index_global(module, name) else None
        if found is None:
            raise pickle.UnpicklingError(f"{module}.{name} has no place in a checkpoint index")
        return found


def _enum_member(cls: Any, name: Any) -> Any:
    """`getattr` as an index may use it: a member of an enum class the unpickler admitted, nothing else."""
    if isinstance(cls, type) and issubclass(cls, enum.Enum) and isinstance(name, str) and name in cls.__members__:
        return cls[name]
    raise pickle.UnpicklingError("getattr in a checkpoint index reaches only members of its enums")


def _index_global(module: str, name: str) -> bool:
    if module == "torch.distributed.checkpoint.metadata":
        return not name.startswith("__")
    if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
        return True
    return (module, name) in _INDEX_GLOBALS


_INDEX_GLOBALS = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                  ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
                  ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}


def read_shard_index(path: Path) -> Any:
    """The `torch.distributed.checkpoint.metadata.Metadata` of the sharded checkpoint `path` (see the unpickler)."""
    try:
        with open(path / ".metadata", "rb") as file:
            return _ShardIndexUnpickler(file).load()
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError, TypeError) as error:
        raise UserError(f"{path}/.metadata, the index of this sharded checkpoint, is missing or not readable "
                        f"({error}): {use_earlier(path)}") from error


def check_sharded(path: Path) -> None:
    """A sharded checkpoint directory is whole: meta.pt passes its checksums; every shard its index names exists and
    holds the entry's bytes; its non-tensor entries (the optimizer's settings) load with `weights_only=True`."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    check_archive(path / SHARD_METADATA, path)
    index = read_shard_index(path)
    for entry, stored in (index.storage_data or {}).items():
        shard = path / stored.relative_path
        if not shard.is_file() or shard.stat().st_size < stored.offset + stored.length:
            raise UserError(f"{path} is incomplete: its shard {stored.relative_path} is missing or cut short; "
                            f"{use_earlier(path)}")
        if getattr(stored, "transform_descriptors", None):
            raise UserError(f"{path} stores {entry.fqn} transformed ({', '.join(stored.transform_descriptors)}), "
                            "which pretrain does not read")
        if isinstance(index.state_dict_metadata.get(entry.fqn), BytesStorageMetadata):
            with open(shard, "rb") as file:
                file.seek(stored.offset)
                raw = file.read(stored.length)
            try:
                torch.load(io.BytesIO(raw), weights_only=True)
            except Exception as error:
                raise UserError(f"{path}: its entry {entry.fqn} holds objects other than tensors and plain data "
                                f"({type(error).__name__}); pretrain does not load it") from error


def shard_reader(path: Path):
    """torch.distributed.checkpoint's reader of `path`, with the index read by `read_shard_index`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeShardReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            index = read_shard_index(path)
            if getattr(index, "storage_meta", None) is None:
                index.storage_meta = StorageMeta()
            index.storage_meta.load_id = self.load_id
            return index

    return SafeShardReader(path)


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """A Lightning checkpoint's contents (on the CPU by default), after checking its checksums, never unpickling
    code (`weights_only=True`). Of a sharded checkpoint directory, everything but the weights and the optimizer
    state (its meta.pt): read the weights with `read_sharded_weights`."""
    path = Path(path)
    check_checkpoint_file(path)
    file = contents_file(path)
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except Exception as error:  # objects that weights_only refuses to unpickle, or a damaged record
        raise UserError(f"{file} could not be read as a checkpoint ({type(error).__name__}: "
                        f"{str(error).splitlines()[0][:200] if str(error) else ''}); it may not come from "
                        "pretrain fit, or it holds objects other than tensors and plain data") from error


def read_sharded_weights(path: Path, weights: dict[str, Tensor]) -> None:
    """Fill `weights` ({name in the module's state dict: a tensor of its shape}) from the sharded checkpoint `path`
    (checked by `read_checkpoint` first), in this process alone."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load({"model": weights}, storage_reader=shard_reader(path), no_dist=True)
    except Exception as error:  # a missing entry or a shape that differs
        message = str(error).strip().splitlines()
        raise UserError(f"{path} does not hold the weights its recipe describes: "
                        f"{message[-1][:300] if message else type(error).__name__}") from error


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
        if is_sharded_checkpoint(Path(path)):  # (FSDP reads these itself, without a CheckpointIO)
            raise UserError(f"{path} is a sharded checkpoint: resume it with --trainer.strategy fsdp_sharded (or "
                            "fsdp), or export its weights (pretrain export) and start a new run from them")
        return read_checkpoint(path, map_location)

    def remove_checkpoint(self, path) -> None:
        Path(path).unlink(missing_ok=True)


# --- the callback ---------------------------------------------------------------------------------------------

def finite_weights(module: torch.nn.Module, strategy: Any = None) -> bool:
    """Whether every floating-point parameter and buffer is finite (one host sync). Each process checks what it
    holds (under FSDP, its shard: nothing is gathered), and with a Lightning `strategy` all processes agree."""
    tensors = [*module.parameters(), *module.buffers()]
    checks = [tensor.isfinite().all() for tensor in tensors if tensor.is_floating_point() and tensor.numel()]
    finite = bool(torch.stack(checks).all()) if checks else True
    return strategy.reduce_boolean_decision(finite, all=True) if strategy is not None else finite


class Checkpoints(Callback):
    """Writes the run's checkpoints into `dirpath` (default: RUN/checkpoints): `last.ckpt` every
    `every_n_train_steps` steps and when training ends, and the last `keep` of them also as `step-NNNNNNNN.ckpt`
    (hard links: one write each), so that one bad save or one bad step never leaves a run with nothing. Older step
    checkpoints are removed once a newer one is safely on disk. `last.ckpt` is always the newest, also in a run
    directory that was moved or copied.

    Refuses (stopping the run with one line) to write from non-finite weights; while the module reports steps being
    skipped for non-finite gradients (`PretrainingModule.skipping`), saving waits for a good step.

    Interruptions save the work (`save_on_signal`): Ctrl-C (SIGINT), SIGTERM (a cluster's preemption or `scancel`)
    and SIGUSR1 (SLURM's warning before the time limit, `#SBATCH --signal=USR1@120`) end the run after the step in
    progress, with a checkpoint of that step; `interrupted` then names the signal and the step, and the command
    exits with 128 + the signal's number. Under SLURM, SIGUSR1 also requeues the job (`scontrol requeue`; the job's
    command resumes with `--ckpt_path last`). With several processes, they stop together at the next logging step
    (deciding it takes a collective, which the logging steps already pay). A second Ctrl-C stops at once, without
    a checkpoint.
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 1000, keep: int = 2,
                 save_on_signal: bool = True):
        if every_n_train_steps < 1:
            raise UserError(f"checkpoint.every_n_train_steps must be at least 1, got {every_n_train_steps}")
        if keep < 0:
            raise UserError(f"checkpoint.keep must be 0 or more, got {keep}")
        self.dirpath = Path(dirpath) if dirpath else None
        self.every_n_train_steps, self.keep, self.save_on_signal = every_n_train_steps, keep, save_on_signal
        self._saved_step: int | None = None
        self.postponed = 0  # saves put off while steps were being skipped
        self.received: int | None = None  # the stopping signal received, if any
        self.interrupted: tuple[str, int] | None = None  # (signal name, step) of a run that a signal ended
        self._handlers: dict[int, Any] = {}

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._install()

    def on_train_start(self, trainer, pl_module) -> None:
        self._install()

    def _install(self) -> None:
        """Our handlers, over Lightning's own SIGTERM handler (which stops without a checkpoint; it is put back at
        the end): from the sanity check on, which Lightning's registration precedes."""
        if self._handlers or not self.save_on_signal or threading.current_thread() is not threading.main_thread():
            return
        self.received, self.interrupted = None, None
        for name in STOP_SIGNALS:
            number = getattr(signal, name, None)
            if number is not None:
                self._handlers[number] = signal.signal(number, self._on_signal)

    def _on_signal(self, number: int, frame) -> None:
        if self.received is not None and number == signal.SIGINT:
            self._restore_handlers()
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = number
        print(f"\n{signal.Signals(number).name}: stopping after this step, with a checkpoint "
              f"(Ctrl-C again stops at once, without one)", file=sys.stderr, flush=True)

    def _restore_handlers(self) -> None:
        for number, handler in self._handlers.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        self._handlers = {}

    def _stop_requested(self, trainer) -> bool:
        if trainer.world_size == 1:
            return self.received is not None
        if trainer.global_step % max(1, trainer.log_every_n_steps):
            return False  # every process decides at the same steps: the logging steps
        return trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_handlers()

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = Path(trainer.default_root_dir) / "checkpoints"
        if trainer.is_global_zero and self.dirpath.is_dir():  # what a save that was killed left behind
            for stale in self.dirpath.glob(".*.ckpt.partial*"):
                remove(stale)

    @property
    def last(self) -> Path:
        return self.dirpath / LAST

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self._handlers and self._stop_requested(trainer):
            name = signal.Signals(self.received).name if self.received is not None else "a signal to another process"
            self.interrupted = (name, step)
            trainer.should_stop = True
        # saved here, not as training ends: the loops' state is that of this step, mid-epoch (exact resume)
        if self.interrupted or step % self.every_n_train_steps == 0 or 0 <= trainer.max_steps <= step:
            self.save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handlers()
        self.save(trainer, pl_module)
        if self.interrupted and self.received == getattr(signal, "SIGUSR1", None) and os.environ.get("SLURM_JOB_ID"):
            requeue(trainer)

    def save(self, trainer, pl_module) -> None:
        step = trainer.global_step
        if step == 0 or step == self._saved_step or trainer.sanity_checking or trainer.fast_dev_run:
            return
        from pretrain.training.module import PretrainingModule

        if isinstance(pl_module, PretrainingModule) and pl_module.skipping():
            self.postponed += 1
            return
        if not finite_weights(pl_module, trainer.strategy):
            raise UnsafeWeightsError(
                f"the weights are not finite at step {step}: no checkpoint was written from them; the newest good one "
                f"is {self.last}. Lower the learning rate or clip gradients (--trainer.gradient_clip_val 1.0), then "
                "resume from it with --ckpt_path last")
        from pretrain.training.distributed import writes_sharded

        if writes_sharded(trainer.strategy):
            self.save_sharded(trainer, step)
            return
        target = self.dirpath / f"step-{step:08d}.ckpt" if self.keep else self.last
        trainer.save_checkpoint(target, weights_only=False)  # the whole state: exact resume
        self._saved_step = step
        if self.keep and trainer.is_global_zero:
            link_or_copy(target, self.last)
            self.prune(self.keep)

    def save_sharded(self, trainer, step: int) -> None:
        """Every process writes its shards into a staging directory; once all have, rank 0 renames it
        `step-NNNNNNNN.ckpt` and points `last.ckpt` at it: until then the previous checkpoint is the last, whole.
        A step saved again (by a resumed run) takes the other of two names, `step-NNNNNNNN-1.ckpt`, so that the one
        `last.ckpt` points to is never moved before the new one is whole. A failed write removes the staging
        directory and stops the run (`CheckpointWriteError`). (With keep 0, the newest directory alone is kept.)"""
        names = [self.dirpath / f"step-{step:08d}.ckpt", self.dirpath / f"step-{step:08d}-1.ckpt"]
        holds_last = self.last.exists() and self.last.resolve() == names[0].resolve()
        target, other = names[::-1] if holds_last else names
        staging = self.dirpath / f".{names[0].name}.partial"
        try:
            trainer.save_checkpoint(staging, weights_only=False)  # ends once every process has written its shards
        except BaseException as error:
            if trainer.is_global_zero:
                remove(staging)
            cause = os_error_in(error)
            if cause is not None:
                raise CheckpointWriteError(write_failure(target, cause)) from error
            raise
        self._saved_step = step
        if trainer.is_global_zero:
            with open(staging / SHARD_METADATA, "rb") as file:  # (torch.distributed.checkpoint fsyncs its own files)
                os.fsync(file.fileno())
            sync_directory(staging)
            replace_directory(staging, target)  # (never the directory last.ckpt points to)
            point_link(self.last, target)
            remove(other)  # this step's earlier save, if any: no longer the last
            self.prune(max(self.keep, 1))

    def prune(self, keep: int) -> None:
        """Remove all but the newest `keep` step checkpoints (by the time they were written), never the one
        `last.ckpt` points to."""
        newest = self.last.resolve() if self.last.exists() else None
        stamped = sorted(self.dirpath.glob("step-*.ckpt"), key=lambda p: (p.stat().st_mtime_ns, p.name))
        for old in stamped[:-keep]:
            if old.resolve() != newest:
                remove(old)
