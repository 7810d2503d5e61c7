"""Streaming examples for corpora larger than memory or disk cache: read, tokenize and pack on the fly, sharded by
rank and by dataloader worker, with a position that can be saved and restored."""

from __future__ import annotations

from collections.abc import Iterator

import datasets
import numpy as np
import torch
from tokenizers import Tokenizer

from pretrain.data.packing import pack_stream, token_columns


def shard(role: int | None = None) -> tuple[int, int]:
    """(this reader's index, number of readers) over distributed ranks x dataloader workers; `role` stands for the
    worker's id."""
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    worker = torch.utils.data.get_worker_info()
    workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
    return rank * workers + (worker_id if role is None else role), world * workers


class StreamingBlocks(torch.utils.data.IterableDataset):
    """The "stream" layout's blocks in the same order as the cached path, computed on the fly from `documents`
    (a `datasets.IterableDataset` with a "text" column). Block k goes to reader k mod readers (readers = ranks x
    dataloader workers); each reader tokenizes the whole stream and keeps its share, which keeps the order exact at
    the price of repeated tokenization. To resume, set `resume_batches` (batches of `batch_size` this rank's loader
    handed out) before the loader is iterated: each worker skips the blocks of the batches it made (earlier blocks
    are re-read, not trained on); the skip applies to the next pass only."""

    def __init__(self, documents: datasets.IterableDataset, tokenizer: Tokenizer, max_length: int, sep_id: int,
                 cls_id: int | None,
                 word_starts: bool = False, read_batch: int = 1000):
        self.documents, self.tokenizer = documents, tokenizer
        self.max_length, self.sep_id, self.cls_id = max_length, sep_id, cls_id
        self.word_starts, self.read_batch = word_starts, read_batch
        self.resume_batches, self.batch_size = 0, 1

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        worker = torch.utils.data.get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        # The loader takes one batch from each worker in turn, starting with worker 0: in a resumed pass worker w
        # plays the part of worker (w + resume_batches) mod workers of the interrupted pass, which had made the
        # batches role, role + workers, ... of those handed out.
        role = (worker_id + self.resume_batches) % workers
        made = max(0, (self.resume_batches - role + workers - 1) // workers)
        skip, self.resume_batches = made * self.batch_size, 0
        reader, readers = shard(role)
        return self._share(reader, readers, skip)

    def _share(self, reader: int, readers: int, skip: int) -> Iterator[dict[str, np.ndarray]]:
        mine = (example for index, example in enumerate(self._all_blocks()) if index % readers == reader)
        for count, example in enumerate(mine):
            if count >= skip:
                yield example

    def _all_blocks(self) -> Iterator[dict[str, np.ndarray]]:
        for part in pack_stream(self._batches(), self.max_length, self.sep_id, self.cls_id):
            for row in range(len(part["input_ids"])):
                yield {name: values[row] for name, values in part.items()}

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        """The documents, tokenized `read_batch` at a time, as flat arrays and lengths. `iter(batch_size=...)` reads
        every document in every reader: a `datasets.IterableDataset` iterated plainly inside a dataloader worker would
        hand each worker only some files, and the round-robin of blocks above would then lose data."""
        for batch in self.documents.iter(batch_size=self.read_batch):
            yield self._tokenized(batch["text"])

    def _tokenized(self, texts: list[str]) -> dict[str, np.ndarray]:
        columns = token_columns(self.tokenizer, texts, self.word_starts)
        flat = {name: np.fromiter((t for doc in docs for t in doc), dtype=np.int32) for name, docs in columns.items()}
        return flat | {"lengths": np.array([len(ids) for ids in columns["input_ids"]])}
