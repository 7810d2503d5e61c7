"""Streaming examples for corpora larger than memory or disk cache: read, tokenize and pack on the fly, sharded by
rank and by dataloader worker, with a position that can be saved and restored."""

from __future__ import annotations

from collections.abc import Iterator

import datasets
import numpy as np
import torch
from tokenizers import Tokenizer

from pretrain.preprocess import pack_stream, token_columns


def shard() -> tuple[int, int]:
    """(this reader's index, number of readers) over distributed ranks x dataloader workers."""
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    worker = torch.utils.data.get_worker_info()
    workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
    return rank * workers + worker_id, world * workers


class StreamingBlocks(torch.utils.data.IterableDataset):
    """The "stream" layout's blocks in the same order as the cached path, computed on the fly from `documents`
    (a `datasets.IterableDataset` with a "text" column). Block k goes to reader k mod readers (readers = ranks x
    dataloader workers); each reader tokenizes the whole stream and keeps its share, which keeps the order exact at
    the price of repeated tokenization. `state_dict()` holds the index of the next block; after `load_state_dict`,
    iteration continues from there (earlier blocks are re-read and skipped). With dataloader workers the position
    advances in the workers' copies, so exact resume needs num_workers=0."""

    def __init__(self, documents: datasets.IterableDataset, tokenizer: Tokenizer, max_length: int, sep_id: int,
                 cls_id: int | None,
                 word_starts: bool = False, read_batch: int = 1000):
        self.documents, self.tokenizer = documents, tokenizer
        self.max_length, self.sep_id, self.cls_id = max_length, sep_id, cls_id
        self.word_starts, self.read_batch = word_starts, read_batch
        self.position = 0  # index of the next block to hand out

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        reader, readers = shard()
        for index, example in enumerate(self._all_blocks()):
            if index >= self.position and index % readers == reader:
                self.position = index + 1
                yield example
        self.position = 0  # the pass is complete: the next one (epoch) starts from the beginning

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
