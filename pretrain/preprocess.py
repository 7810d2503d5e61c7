"""Tokenized documents -> training examples, in the two layouts the objectives ask for, with a fingerprinted cache.

"stream": documents (each followed by [SEP]/EOS) packed back to back into blocks of exactly `max_length` tokens
(the last may be shorter), [CLS] first when `cls_first`, with the document id of every token, so attention and the
CLM loss can stay inside a document. "pairs": BERT-style [CLS] A [SEP] B [SEP] from the sentences of one document,
with NSP negatives from another document.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import datasets
import numpy as np
from tokenizers import Tokenizer

from objectives.nsp import IS_NEXT, NOT_NEXT
from pretrain.errors import UserError

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


# --- cache ----------------------------------------------------------------------------------------------------

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
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created if needed) for the duration of the block: processes that build the same
    thing (ranks of one run, or runs sharing a cache) take turns, so the first builds and the others find it built.
    (Where `fcntl` does not exist, no lock.)"""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


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
                partial = Path(cache_dir) / f".{key}.partial-{socket.gethostname()}-{os.getpid()}"
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)
                write_arrays(partial, build())
                (partial / "COMPLETE").write_text("ok\n")
                shutil.rmtree(final, ignore_errors=True)
                os.replace(partial, final)
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
    finally:
        for file in files.values():
            file.close()
    (directory / "arrays.json").write_text(json.dumps(layout))


def load_arrays(directory: Path) -> dict[str, np.ndarray]:
    layout = json.loads((directory / "arrays.json").read_text())
    return {name: np.memmap(directory / f"{name}.bin", dtype=spec["dtype"], mode="r", shape=tuple(spec["shape"]))
            if spec["shape"][0] else np.zeros(spec["shape"], spec["dtype"]) for name, spec in layout.items()}


# --- tokenization ---------------------------------------------------------------------------------------------

def token_columns(tokenizer: Tokenizer, texts: list[str], word_starts: bool) -> dict[str, list]:
    """input_ids (and word_starts: 1 where a token begins a word) of each text, without special tokens."""
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    columns = {"input_ids": [e.ids for e in encodings]}
    if word_starts:
        columns["word_starts"] = [[int(w != p) for w, p in zip(e.word_ids, [None, *e.word_ids[:-1]], strict=True)]
                                  for e in encodings]
    return columns


def tokenize(corpus: datasets.Dataset, tokenizer: Tokenizer, word_starts: bool = False,
             num_proc: int | None = None) -> datasets.Dataset:
    """Token ids of every document (datasets.map, batched, in `num_proc` processes). The result is written as
    Arrow beside the corpus's own cache files (memory-mapped; nothing is pickled back from the workers)."""
    key = hashlib.sha256(tokenizer.to_str().encode() + bytes([word_starts])).hexdigest()[:16]
    return corpus.map(
        lambda batch: token_columns(tokenizer, batch["text"], word_starts), batched=True, batch_size=1000,
        num_proc=num_proc, remove_columns=corpus.column_names, desc="Tokenizing",
        new_fingerprint=f"{corpus._fingerprint}-tokens-{key}",  # the tokenizer is not hashable by datasets
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
                cls_id: int | None) -> Iterator[dict[str, np.ndarray]]:
    """The blocks, in order, a part at a time: (m, max_length) arrays plus `lengths` (m,), which is max_length except
    for a shorter last block, padded with `sep_id` (its padding gets attention mask 0 in the collator)."""
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
    elif produced == 0:
        raise UserError("the corpus is empty: it produced no tokens")


# --- the pairs layout -----------------------------------------------------------------------------------------

def split_sentences(text: str) -> list[str]:
    return [s for s in (part.strip() for part in _SENTENCE_END.split(text)) if s]


def sentence_tokens(
    corpus: datasets.Dataset, tokenizer: Tokenizer, num_proc: int | None = None
) -> list[list[list[int]]]:
    """Every document as a list of tokenized sentences."""
    def encode(batch):
        sentences = [split_sentences(text) for text in batch["text"]]
        flat = tokenizer.encode_batch([s for doc in sentences for s in doc], add_special_tokens=False)
        out, index = [], 0
        for doc in sentences:
            out.append([flat[index + j].ids for j in range(len(doc))])
            index += len(doc)
        return {"sentences": out}

    tokenized = corpus.map(encode, batched=True, batch_size=1000, num_proc=num_proc,
                           remove_columns=corpus.column_names, keep_in_memory=True, desc="Splitting sentences")
    return [doc for doc in tokenized["sentences"] if doc]


def build_pairs(documents: list[list[list[int]]], max_length: int, cls_id: int, sep_id: int, pad_id: int,
                task: str = "nsp", short_seq_prob: float = 0.1, seed: int = 0) -> dict[str, np.ndarray]:
    """BERT's create_pretraining_data: sentences of one document accumulate up to a target length (shorter with
    `short_seq_prob`), A is a random prefix of them, B the rest. For NSP, half of the B are replaced by sentences
    of another document (label NOT_NEXT). A chunk of a single sentence is cut inside the sentence, so the 50/50 draw
    is never forced (BERT forces a random B there, which skews the labels). For SOP, A and B are always consecutive
    (the objective swaps them). Returns input_ids, token_type_ids (n, max_length), lengths and labels (n,)."""
    if task == "nsp" and len(documents) < 2:
        raise UserError("next sentence prediction needs at least two documents in the corpus")
    rng = random.Random(seed)
    max_tokens = max_length - 3
    rows: list[tuple[list[int], list[int], int]] = []
    for index, document in enumerate(documents):
        target = rng.randint(2, max_tokens) if rng.random() < short_seq_prob else max_tokens
        chunk, length = [], 0
        for i, sentence in enumerate(document):
            chunk.append(sentence)
            length += len(sentence)
            if i == len(document) - 1 or length >= target:
                rows.extend(_pair_from_chunk(chunk, documents, index, target, task, rng))
                target = rng.randint(2, max_tokens) if rng.random() < short_seq_prob else max_tokens
                chunk, length = [], 0
    n = len(rows)
    if n == 0:
        raise UserError("the corpus gave no sentence pairs: its documents are empty or one token long")
    input_ids = np.full((n, max_length), pad_id, dtype=np.int32)
    token_type_ids = np.zeros((n, max_length), dtype=np.int8)
    lengths, labels = np.zeros(n, dtype=np.int32), np.zeros(n, dtype=np.int8)
    for row, (a, b, label) in enumerate(rows):
        _truncate_pair(a, b, max_tokens, rng)
        ids = [cls_id, *a, sep_id, *b, sep_id]
        input_ids[row, :len(ids)] = ids
        token_type_ids[row, len(a) + 2:len(ids)] = 1
        lengths[row], labels[row] = len(ids), label
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "lengths": lengths, "labels": labels}


def _pair_from_chunk(chunk, documents, index, target, task, rng) -> list[tuple[list[int], list[int], int]]:
    if len(chunk) == 1:
        tokens = chunk[0]
        if len(tokens) < 2:
            return []
        cut = rng.randint(1, len(tokens) - 1)
        chunk = [tokens[:cut], tokens[cut:]]
    a_end = rng.randint(1, len(chunk) - 1)
    a = [t for sentence in chunk[:a_end] for t in sentence]
    if task == "nsp" and rng.random() < 0.5:
        other = index
        while other == index:
            other = rng.randrange(len(documents))
        sentences = documents[other]
        b = []
        for sentence in sentences[rng.randrange(len(sentences)):]:
            b.extend(sentence)
            if len(b) >= max(1, target - len(a)):
                break
        return [(a, b, NOT_NEXT)]
    return [(a, [t for sentence in chunk[a_end:] for t in sentence], IS_NEXT)]


def _truncate_pair(a: list[int], b: list[int], max_tokens: int, rng: random.Random) -> None:
    """BERT's truncate_seq_pair: trim the longer side, from the front or the back at random."""
    while len(a) + len(b) > max_tokens:
        longer = a if len(a) > len(b) else b
        del longer[0 if rng.random() < 0.5 else -1]
