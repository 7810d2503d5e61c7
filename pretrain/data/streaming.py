"""Streaming examples for corpora larger than memory or disk: read, tokenize and lay out on the fly ("stream" blocks
or "pairs"), each document tokenized by one reader only (readers = distributed ranks x dataloader workers), shuffled
through seeded buffers, with a position per reader that can be saved and restored."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

import datasets
import numpy as np
import torch
from tokenizers import Tokenizer

from pretrain.data.packing import pack_stream, token_columns
from pretrain.data.pairs import SHARD_DOCUMENTS, document_sentences, padded, pairs_of_documents, shard_rng
from pretrain.errors import UserError

T = TypeVar("T")
Group = tuple[int, list[str]]  # a key unique in the pass (it seeds the group's draws), the texts


def shard(role: int | None = None) -> tuple[int, int]:
    """(this reader's index, number of readers) over distributed ranks x dataloader workers; `role` stands for the
    worker's id."""
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    worker = torch.utils.data.get_worker_info()
    workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
    return rank * workers + (worker_id if role is None else role), world * workers


def shuffled(items: Iterable[T], size: int, rng: np.random.Generator) -> Iterator[T]:
    """`items` in a random order drawn through a buffer of `size` items (the larger, the more thorough; memory is
    `size` items): each new item takes the place of a random one, which is yielded."""
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = int(rng.integers(size))
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


class StreamLayout:
    """The "stream" layout on the fly: each group of documents tokenized, then packed into blocks across groups (the
    last block of a reader's pass may be shorter)."""

    def __init__(self, tokenizer: Tokenizer, max_length: int, sep_id: int, cls_id: int | None,
                 word_starts: bool = False):
        self.tokenizer, self.max_length, self.sep_id, self.cls_id = tokenizer, max_length, sep_id, cls_id
        self.word_starts = word_starts

    def parts(self, groups: Iterable[Group], epoch: int) -> Iterator[dict[str, np.ndarray]]:
        return pack_stream((self._tokenized(texts) for _, texts in groups), self.max_length, self.sep_id,
                           self.cls_id, empty_ok=True)

    def _tokenized(self, texts: list[str]) -> dict[str, np.ndarray]:
        columns = token_columns(self.tokenizer, texts, self.word_starts)
        flat = {name: np.fromiter((t for doc in docs for t in doc), dtype=np.int32) for name, docs in columns.items()}
        return flat | {"lengths": np.array([len(ids) for ids in columns["input_ids"]])}


class PairLayout:
    """The "pairs" layout on the fly: each group of documents is one shard of `pretrain.data.pairs` (its NSP
    negatives come from the group), drawn anew each epoch (other cuts and negatives: BERT's dupe_factor, free)."""

    def __init__(self, tokenizer: Tokenizer, max_length: int, cls_id: int, sep_id: int, pad_id: int, task: str,
                 short_seq_prob: float, seed: int):
        self.tokenizer, self.max_length, self.task, self.short_seq_prob = tokenizer, max_length, task, short_seq_prob
        self.cls_id, self.sep_id, self.pad_id, self.seed = cls_id, sep_id, pad_id, seed

    def parts(self, groups: Iterable[Group], epoch: int) -> Iterator[dict[str, np.ndarray]]:
        for key, texts in groups:
            rows = pairs_of_documents(document_sentences(self.tokenizer, texts), self.max_length, self.task,
                                      self.short_seq_prob, shard_rng(self.seed, epoch, key))
            if rows:
                yield padded(rows, self.max_length, self.cls_id, self.sep_id, self.pad_id)


class StreamingExamples(torch.utils.data.IterableDataset):
    """Examples computed on the fly from `documents` (a `datasets.IterableDataset` with a "text" column) in `layout`.

    Sharding: document i goes to reader i mod readers (readers = ranks x dataloader workers), which tokenizes its
    documents `read_batch` at a time: every reader reads the text, but each document is tokenized by exactly one
    reader, and each example comes from exactly one. Shuffling (`shuffle_buffer` > 0): documents, then examples,
    pass through seeded buffers of that many items; the order is a function of (seed, epoch, reader) alone, so
    every epoch is reshuffled and a resumed pass repeats it exactly. Without shuffling, one reader's examples are
    those of the cached path, in its order.

    Epochs: `epoch` is the epoch of the next pass; every pass over a copy (a persistent worker's too) counts on,
    unless `same_every_pass` (validation: every pass the examples of epoch 0, unshuffled). With `endless` (set for
    several ranks, whose shares differ in length: a rank that ended its epoch early would wait for the others
    forever) one iteration runs the passes back to back, epoch after epoch, and the run ends at its max_steps.
    Resume: set `resume` = (batches handed out in the epoch, (pass, examples made in that pass) of each role) before
    the loader is iterated: the loader takes one batch from each worker in turn, starting with worker 0, so in the
    resumed pass worker w plays the part of role (w + batches) mod workers of the interrupted pass, starts at that
    role's pass and skips the examples the role made in it (they are recomputed, not trained on): a resume costs at
    most one pass of one reader's share, however long the run (endless passes are counted one by one); the skip
    applies to the next iteration only. Every example carries its role ("reader") and its pass ("pass") for the
    data module to count."""

    def __init__(self, documents: datasets.IterableDataset, layout: StreamLayout | PairLayout,
                 shuffle_buffer: int = 0, seed: int = 0, read_batch: int = SHARD_DOCUMENTS,
                 same_every_pass: bool = False):
        self.documents, self.layout = documents, layout
        self.shuffle_buffer = 0 if same_every_pass else shuffle_buffer
        self.seed, self.read_batch, self.same_every_pass = seed, read_batch, same_every_pass
        self.epoch, self.endless = 0, False
        self.resume: tuple[int, list[int]] | None = None

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        worker = torch.utils.data.get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        epoch, self.epoch = self.epoch, self.epoch + (not self.same_every_pass)
        (offset, made), self.resume = self.resume or (0, [(epoch, 0)] * workers), None
        if len(made) != workers:
            raise ValueError(f"the position has {len(made)} readers' counts, the loader {workers} workers")
        role = (worker_id + offset) % workers
        reader, readers = shard(role)
        start, skip = made[role]
        return self._passes(reader, readers, start, skip, role)

    def _passes(self, reader: int, readers: int, epoch: int, skip: int, role: int
                ) -> Iterator[dict[str, np.ndarray]]:
        """The reader's passes from `epoch` on (one unless `endless`), the first `skip` examples of the first left
        out; each example tagged with its role and pass."""
        tags = {"reader": np.int64(role)}
        while True:
            empty = True
            tags["pass"] = np.int64(epoch)
            for count, example in enumerate(self.examples(reader, readers, epoch)):
                empty = False
                if count >= skip:
                    yield example | tags
            if empty and self.endless:  # its rank would stop while the others wait for it at the next step
                raise UserError(f"streaming reader {reader} of {readers} (ranks x data workers) found no document: "
                                f"the corpus has fewer documents than readers; use fewer --data.num_workers or "
                                "devices, or the cached path (--data.streaming false)")
            if not self.endless or empty:  # (a reader with nothing to read ends)
                return
            epoch, skip = epoch + 1, 0

    def examples(self, reader: int, readers: int, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        """Reader `reader`'s examples (of `readers`) in epoch `epoch`."""
        rows = (({name: values[row] for name, values in part.items()})
                for part in self.layout.parts(self._groups(reader, readers, epoch), epoch)
                for row in range(len(part["input_ids"])))
        if self.shuffle_buffer:
            rows = shuffled(rows, self.shuffle_buffer, np.random.default_rng([self.seed, epoch, reader, 1]))
        return rows

    def _groups(self, reader: int, readers: int, epoch: int) -> Iterator[Group]:
        """This reader's documents (those whose index i has i mod readers == reader: every reader has some once
        the corpus has as many documents as there are readers) in groups of `read_batch`, keyed by their first
        document's index; shuffled, groups of the buffer's output, keyed by reader and count."""
        mine = (text for b, batch in enumerate(self.documents.iter(batch_size=self.read_batch))
                for i, text in enumerate(batch["text"], start=b * self.read_batch) if i % readers == reader)
        if not self.shuffle_buffer:
            group: list[str] = []
            count = 0
            for text in mine:
                group.append(text)
                if len(group) == self.read_batch:
                    yield count * self.read_batch * readers + reader, group
                    group, count = [], count + 1
            if group:
                yield count * self.read_batch * readers + reader, group
            return
        texts = shuffled(mine, self.shuffle_buffer, np.random.default_rng([self.seed, epoch, reader, 0]))
        group = []
        count = 0
        for text in texts:
            group.append(text)
            if len(group) == self.read_batch:
                yield count * readers + reader, group
                group, count = [], count + 1
        if group:
            yield count * readers + reader, group
