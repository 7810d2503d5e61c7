"""The examples cache: arrays written once under a fingerprint of their inputs, memory-mapped after, built by one
process while others wait."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout
from tokenizers import Tokenizer

from pretrain.errors import UserError

LOCK_TIMEOUT = 24 * 3600  # seconds: a cache of a large corpus can take hours to build; a lock held longer is a hang



def fingerprint(files: Iterable[Path], tokenizer: Tokenizer, settings: dict) -> str:
    """A key for the corpus files (paths, sizes, modification times), the tokenizer and the settings."""
    digest = hashlib.sha256()
    for path in files:
        stat = Path(path).stat()
        digest.update(f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    digest.update(hashlib.sha256(tokenizer.to_str().encode()).digest())
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:20]


@contextlib.contextmanager
def file_lock(path: Path, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """An exclusive lock on `path` (created if needed; `filelock`, on every platform) for the duration of the block:
    processes that build the same thing (ranks of one run, or runs sharing a cache) take turns, so the first builds
    and the others find it built. A lock held by a process that died is free again; one held past `timeout` seconds
    is one line naming the lock file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=min(30.0, timeout))
    except Timeout:
        print(f"waiting for {path}: another process is building what it guards", flush=True)
        try:
            lock.acquire(timeout=max(0.0, timeout - 30.0))
        except Timeout:
            raise UserError(f"waited {timeout / 60:,.0f} min for the lock {path}: another process holds it (a run "
                            "building the same cache or tokenizer; a process that died holds no lock). Stop that run, "
                            "or give this one another --data.cache_dir") from None
    try:
        yield
    finally:
        lock.release()


def write_synced(path: Path, data: bytes) -> None:
    """Write `path` and wait until its bytes are on the disk (what marks a cache complete must not land first)."""
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def sync_directory(path: Path) -> None:
    """Make the entries of directory `path` (files created, a rename) durable, where the platform allows it (the
    cache's and the checkpoints': a crash right after a rename must not bring the old name back)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # not every platform opens directories
        return
    try:
        with contextlib.suppress(OSError):  # some filesystems refuse to fsync a directory: the entries still stand
            os.fsync(descriptor)
    finally:
        os.close(descriptor)


def cached_arrays(cache_dir: Path, key: str,
                  build: Callable[[], Iterable[dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    """The arrays `build()` yields in parts (rows of each array, in order), written under cache_dir/key part by part
    and memory-mapped, now and on later calls. Built once: a process that finds another building the same key waits
    for it (`file_lock`), then reads what it built. The directory is written under a temporary name and renamed
    when complete, so an interrupted run never leaves a cache that is trusted."""
    final = Path(cache_dir) / key
    if not (final / "COMPLETE").is_file():
        with file_lock(Path(cache_dir) / f".{key}.lock"):
            if not (final / "COMPLETE").is_file():
                print(f"building the examples cache {final} (once; later runs read it)", flush=True)
                for stale in Path(cache_dir).glob(f".{key}.partial-*"):  # left by a killed build (we hold the lock)
                    shutil.rmtree(stale, ignore_errors=True)
                partial = Path(cache_dir) / f".{key}.partial-{socket.gethostname()}-{os.getpid()}"
                partial.mkdir(parents=True)
                write_arrays(partial, build())  # its files on the disk before the mark that trusts them
                write_synced(partial / "COMPLETE", b"ok\n")
                sync_directory(partial)
                shutil.rmtree(final, ignore_errors=True)
                os.replace(partial, final)
                sync_directory(Path(cache_dir))
                size = sum(path.stat().st_size for path in final.iterdir())
                print(f"wrote the examples cache {final}: {size / 2**20:,.1f} MiB", flush=True)
    return load_arrays(final)


def write_arrays(directory: Path, parts: Iterable[dict[str, np.ndarray]]) -> None:
    """Append each part's rows to NAME.bin files; shapes and dtypes go to arrays.json. Memory: one part at a time."""
    layout: dict[str, dict] = {}
    files = {}
    try:
        for part in parts:
            for name, rows in part.items():
                if name not in files:
                    files[name] = open(directory / f"{name}.bin", "wb")  # noqa: SIM115 (closed below)
                    layout[name] = {"dtype": rows.dtype.str, "shape": [0, *rows.shape[1:]]}
                files[name].write(np.ascontiguousarray(rows, dtype=layout[name]["dtype"]).tobytes())
                layout[name]["shape"][0] += len(rows)
        for file in files.values():
            file.flush()
            os.fsync(file.fileno())
    finally:
        for file in files.values():
            file.close()
    write_synced(directory / "arrays.json", json.dumps(layout).encode())


def load_arrays(directory: Path) -> dict[str, np.ndarray]:
    layout = json.loads((directory / "arrays.json").read_text())
    return {name: np.memmap(directory / f"{name}.bin", dtype=spec["dtype"], mode="r", shape=tuple(spec["shape"]))
            if spec["shape"][0] else np.zeros(spec["shape"], spec["dtype"]) for name, spec in layout.items()}
