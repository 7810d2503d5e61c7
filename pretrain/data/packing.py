"""Tokenized documents -> the "stream" layout: documents (each followed by [SEP]/EOS) packed back to back into blocks
of exactly `max_length` tokens (the last may be shorter), [CLS] first when `cls_first`, with the document id of every
token, so attention and the CLM loss can stay inside a document."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import datasets
import numpy as np
from tokenizers import Tokenizer

from pretrain.errors import UserError


def token_columns(tokenizer: Tokenizer, texts: list[str], word_starts: bool) -> dict[str, list]:
    """input_ids (and word_starts: 1 where a token begins a word) of each text, without special tokens."""
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    columns = {"input_ids": [e.ids for e in encodings]}
    if word_starts:
        columns["word_starts"] = [[int(w != p) for w, p in zip(e.word_ids, [None, *e.word_ids[:-1]], strict=True)]
                                  for e in encodings]
    return columns


def tokenize(corpus: datasets.Dataset, tokenizer: Tokenizer, key: str, word_starts: bool = False,
             num_proc: int | None = None) -> datasets.Dataset:
    """Token ids of every document (datasets.map, batched, in `num_proc` processes). The result is written as
    Arrow beside the corpus's own cache files (memory-mapped; nothing is pickled back from the workers), under
    `key`: it must name these documents (e.g. `pretrain.data.cache.fingerprint` of their files and settings); the
    tokenizer and `word_starts` are added to it here (datasets cannot hash a tokenizer)."""
    digest = hashlib.sha256(f"{key}|".encode() + tokenizer.to_str().encode() + bytes([word_starts])).hexdigest()
    return corpus.map(
        lambda batch: token_columns(tokenizer, batch["text"], word_starts), batched=True, batch_size=1000,
        num_proc=num_proc, remove_columns=corpus.column_names, desc="Tokenizing", new_fingerprint=digest[:32],
    )


def tokenized_batches(tokenized: datasets.Dataset, batch_size: int = 10_000) -> Iterator[dict[str, np.ndarray]]:
    """Batches of documents as flat arrays straight from Arrow: values, per-document lengths (no Python lists)."""
    table = tokenized.data.table
    for start in range(0, len(tokenized), batch_size):
        chunk = table.slice(start, batch_size)
        lists = {name: chunk.column(name).combine_chunks() for name in chunk.column_names}
        yield {name: values.flatten().to_numpy(zero_copy_only=False).astype(np.int32)
               for name, values in lists.items()} | {"lengths": np.diff(lists["input_ids"].offsets.to_numpy())}


# --- the stream layout ----------------------------------------------------------------------------------------

class StreamPacker:
    """Packs batches of documents into blocks incrementally; used by the cached and the streaming paths alike.

    Each document is followed by `sep_id`; blocks hold `max_length` tokens, the first being `cls_id` when given.
    """

    def __init__(self, max_length: int, sep_id: int, cls_id: int | None = None):
        self.content = max_length - (cls_id is not None)
        if self.content < 1:
            raise UserError(f"max_length {max_length} is too short")
        self.sep_id, self.cls_id = sep_id, cls_id
        self.carry: dict[str, np.ndarray] = {}
        self.documents_seen = 0

    def add(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Full blocks from the carried tokens plus this batch: input_ids, document_ids (and word_starts) (m, L).
        Empty documents are skipped (no separator, no document id)."""
        if (batch["lengths"] == 0).any():
            batch = dict(batch, lengths=batch["lengths"][batch["lengths"] > 0])
        lengths = batch["lengths"]
        n = len(lengths)
        total = int(lengths.sum()) + n
        ends = np.cumsum(lengths + 1) - 1  # where each document's separator goes
        is_token = np.ones(total, dtype=bool)
        is_token[ends] = False
        stream = {"input_ids": np.full(total, self.sep_id, dtype=np.int32)}
        stream["input_ids"][is_token] = batch["input_ids"]
        stream["document_ids"] = np.repeat(np.arange(self.documents_seen, self.documents_seen + n, dtype=np.int32),
                                           lengths + 1)
        if "word_starts" in batch:
            stream["word_starts"] = np.ones(total, dtype=np.int8)
            stream["word_starts"][is_token] = batch["word_starts"]
        self.documents_seen += n
        for name in stream:
            stream[name] = np.concatenate([self.carry[name], stream[name]]) if name in self.carry else stream[name]
        full = len(stream["input_ids"]) // self.content * self.content
        self.carry = {name: values[full:] for name, values in stream.items()}
        return self._blocks({name: values[:full] for name, values in stream.items()})

    def finish(self) -> dict[str, np.ndarray]:
        """The last, shorter block as (1, length) arrays, or {} when nothing is left."""
        rest, self.carry = self.carry, {}
        if not rest or len(rest["input_ids"]) == 0:
            return {}
        return self._with_cls({name: values[None] for name, values in rest.items()})

    def _blocks(self, flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(flat["input_ids"]) // self.content
        return self._with_cls({name: values.reshape(rows, self.content) for name, values in flat.items()})

    def _with_cls(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Prepend [CLS] (a word start, in the document of the token after it) to every row."""
        if self.cls_id is None:
            return arrays
        first = {"input_ids": self.cls_id, "word_starts": 1}
        return {name: np.concatenate([values[:, :1] if name == "document_ids"
                                      else np.full((len(values), 1), first[name], values.dtype), values], axis=1)
                for name, values in arrays.items()}


def pack_stream(batches: Iterable[dict[str, np.ndarray]], max_length: int, sep_id: int,
                cls_id: int | None, empty_ok: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """The blocks, in order, a part at a time: (m, max_length) arrays plus `lengths` (m,), which is max_length except
    for a shorter last block, padded with `sep_id` (its padding gets attention mask 0 in the collator). No tokens at
    all is an error unless `empty_ok` (a streaming reader's share may be empty)."""
    packer = StreamPacker(max_length, sep_id, cls_id)
    produced = 0
    for batch in batches:
        blocks = packer.add(batch)
        if len(blocks["input_ids"]):
            produced += len(blocks["input_ids"])
            yield blocks | {"lengths": np.full(len(blocks["input_ids"]), max_length, dtype=np.int32)}
    last = packer.finish()
    if last:
        length = last["input_ids"].shape[1]
        yield {name: np.pad(values, ((0, 0), (0, max_length - length)),
                            constant_values=sep_id if name == "input_ids" else 0)
               for name, values in last.items()} | {"lengths": np.array([length], dtype=np.int32)}
    elif produced == 0 and not empty_ok:
        raise UserError("the corpus is empty: it produced no tokens")
