"""Tokenized documents -> the "pairs" layout: BERT-style [CLS] A [SEP] B [SEP] from the sentences of one document,
with NSP negatives from another document (or consecutive segments, for SOP to swap).

Built shard by shard (`SHARD_DOCUMENTS` documents at a time): in the cached path by one `datasets.map` (batched, in
`num_proc` processes, written as Arrow and read back a part at a time, so memory does not grow with the corpus), in
the streaming path on the fly. NSP negatives come from another document of the same shard, as in BERT, whose
create_pretraining_data ran on one input shard at a time. Each shard's random draws come from its own generator,
keyed by (seed, epoch, index of its first document): shards can be built in any order and process."""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator

import datasets
import numpy as np
from tokenizers import Tokenizer

from objectives.nsp import IS_NEXT, NOT_NEXT
from pretrain.errors import UserError

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
SHARD_DOCUMENTS = 1000
VERSION = 2  # part of the examples cache's key: pairs cached under earlier rules are built anew
Pair = tuple[list[int], list[int], int]  # A's tokens, B's tokens, the NSP label


def split_sentences(text: str) -> list[str]:
    return [s for s in (part.strip() for part in _SENTENCE_END.split(text)) if s]


def document_sentences(tokenizer: Tokenizer, texts: list[str]) -> list[list[list[int]]]:
    """Every text as a list of tokenized sentences (one `encode_batch` for all the sentences of the batch); texts
    without a sentence are left out."""
    sentences = [split_sentences(text) for text in texts]
    flat = tokenizer.encode_batch([s for doc in sentences for s in doc], add_special_tokens=False)
    out, index = [], 0
    for doc in sentences:
        if doc:
            out.append([flat[index + j].ids for j in range(len(doc))])
        index += len(doc)
    return out


def shard_rng(seed: int, epoch: int, start: int) -> random.Random:
    return random.Random(f"{seed}|{epoch}|{start}")


def pairs_of_documents(documents: list[list[list[int]]], max_length: int, task: str, short_seq_prob: float,
                       rng: random.Random) -> list[Pair]:
    """BERT's create_pretraining_data on one shard: sentences of one document accumulate up to a target length
    (shorter with `short_seq_prob`), A is a random prefix of them, B the rest. For NSP, half of the B are replaced by
    sentences of another document of the shard (label NOT_NEXT; a shard of one document has no other, and keeps its
    B), and the B not used goes back to the document, to start the next chunk (as in BERT). A chunk of a single
    sentence is cut inside the sentence, so the 50/50 draw is never forced (BERT forces a random B there, which skews
    the labels). For SOP, A and B are always consecutive (the objective swaps them).
    Each pair is truncated to fit max_length with [CLS] and two [SEP]s."""
    max_tokens = max_length - 3
    rows: list[Pair] = []
    for index, document in enumerate(documents):
        target = rng.randint(2, max_tokens) if rng.random() < short_seq_prob else max_tokens
        chunk, length, i = [], 0, 0
        while i < len(document):
            chunk.append(document[i])
            length += len(document[i])
            if i == len(document) - 1 or length >= target:
                pairs, unused = _pair_from_chunk(chunk, documents, index, target, task, rng)
                rows.extend(pairs)
                i -= unused  # at least A's first sentence was used: the loop advances
                target = rng.randint(2, max_tokens) if rng.random() < short_seq_prob else max_tokens
                chunk, length = [], 0
            i += 1
    for a, b, _ in rows:
        _truncate_pair(a, b, max_tokens, rng)
    return rows


def padded(rows: list[Pair], max_length: int, cls_id: int, sep_id: int, pad_id: int) -> dict[str, np.ndarray]:
    """Pairs as arrays: input_ids, token_type_ids (n, max_length), lengths and labels (n,)."""
    return padded_arrays([[cls_id, *a, sep_id, *b, sep_id] for a, b, _ in rows], [len(a) for a, _, _ in rows],
                         [label for _, _, label in rows], max_length, pad_id)


def padded_arrays(ids: list[list[int]] | np.ndarray, a_lengths, labels, max_length: int, pad_id: int,
                  lengths: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """input_ids padded to max_length, token_type_ids 1 from B's first token to the final [SEP], lengths, labels.
    `ids` is a list of rows, or (with `lengths`) the rows' values back to back."""
    if lengths is None:
        lengths = np.array([len(row) for row in ids], dtype=np.int32)
        ids = np.fromiter((t for row in ids for t in row), dtype=np.int32, count=int(lengths.sum()))
    n, positions = len(lengths), np.arange(max_length)
    inside = positions < lengths[:, None]
    input_ids = np.full((n, max_length), pad_id, dtype=np.int32)
    input_ids[inside] = ids
    second = positions >= np.asarray(a_lengths, dtype=np.int32)[:, None] + 2
    return {"input_ids": input_ids, "token_type_ids": (second & inside).astype(np.int8),
            "lengths": lengths.astype(np.int32), "labels": np.asarray(labels, dtype=np.int8)}


def build_pairs(documents: list[list[list[int]]], max_length: int, cls_id: int, sep_id: int, pad_id: int,
                task: str = "nsp", short_seq_prob: float = 0.1, seed: int = 0) -> dict[str, np.ndarray]:
    """The pairs of `documents` taken as one shard (see `pairs_of_documents`), as arrays."""
    if task == "nsp" and len(documents) < 2:
        raise UserError("next sentence prediction needs at least two documents in the corpus")
    rows = pairs_of_documents(documents, max_length, task, short_seq_prob, shard_rng(seed, 0, 0))
    if not rows:
        raise UserError("the corpus gave no sentence pairs: its documents are empty or one token long")
    return padded(rows, max_length, cls_id, sep_id, pad_id)


def pair_dataset(corpus: datasets.Dataset, tokenizer: Tokenizer, key: str, max_length: int, cls_id: int,
                 sep_id: int, task: str, short_seq_prob: float, seed: int,
                 num_proc: int | None = None) -> datasets.Dataset:
    """The pairs of the corpus (columns input_ids: [CLS] A [SEP] B [SEP], a_length, labels), one `datasets.map`
    over shards of SHARD_DOCUMENTS documents in `num_proc` processes, written as Arrow under `key` (which must name
    the documents and the settings; the tokenizer is added here). With num_proc, a process's last shard may be
    shorter: the pairs depend on num_proc, not on anything else."""
    digest = hashlib.sha256(f"pairs|{key}|".encode() + tokenizer.to_str().encode()).hexdigest()[:32]

    def shard(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        rows = pairs_of_documents(document_sentences(tokenizer, batch["text"]), max_length, task, short_seq_prob,
                                  shard_rng(seed, 0, indices[0]))
        return {"input_ids": [[cls_id, *a, sep_id, *b, sep_id] for a, b, _ in rows],
                "a_length": [len(a) for a, _, _ in rows], "labels": [label for _, _, label in rows]}

    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                  "a_length": datasets.Value("int32"), "labels": datasets.Value("int8")})
    return corpus.map(shard, batched=True, batch_size=SHARD_DOCUMENTS, with_indices=True, num_proc=num_proc,
                      remove_columns=corpus.column_names, features=features, new_fingerprint=digest,
                      desc="Building sentence pairs")


def pair_parts(pairs: datasets.Dataset, max_length: int, pad_id: int, task: str,
               batch_size: int = 10_000) -> Iterator[dict[str, np.ndarray]]:
    """The pairs as padded arrays, `batch_size` rows at a time straight from Arrow (bounded memory)."""
    if len(pairs) == 0:
        raise UserError("the corpus gave no sentence pairs: its documents are empty or one token long")
    table = pairs.data.table
    negatives = 0
    for start in range(0, len(pairs), batch_size):
        chunk = table.slice(start, batch_size)
        ids = chunk.column("input_ids").combine_chunks()
        labels = chunk.column("labels").to_numpy()
        negatives += int((labels == NOT_NEXT).sum())
        yield padded_arrays(ids.flatten().to_numpy(), chunk.column("a_length").to_numpy(), labels, max_length,
                            pad_id, lengths=np.diff(ids.offsets.to_numpy()).astype(np.int32))
    if task == "nsp" and negatives == 0:
        raise UserError("next sentence prediction needs at least two documents in the corpus")


def _pair_from_chunk(chunk, documents, index, target, task, rng) -> tuple[list[Pair], int]:
    """The chunk's pair, and how many of its sentences were not used (a random B leaves the chunk's own B)."""
    whole = len(chunk) > 1
    if not whole:
        tokens = chunk[0]
        if len(tokens) < 2:
            return [], 0
        cut = rng.randint(1, len(tokens) - 1)
        chunk = [tokens[:cut], tokens[cut:]]
    a_end = rng.randint(1, len(chunk) - 1)
    a = [t for sentence in chunk[:a_end] for t in sentence]
    if task == "nsp" and len(documents) > 1 and rng.random() < 0.5:
        other = index
        while other == index:
            other = rng.randrange(len(documents))
        sentences = documents[other]
        b = []
        for sentence in sentences[rng.randrange(len(sentences)):]:
            b.extend(sentence)
            if len(b) >= max(1, target - len(a)):
                break
        return [(a, b, NOT_NEXT)], len(chunk) - a_end if whole else 0
    return [(a, [t for sentence in chunk[a_end:] for t in sentence], IS_NEXT)], 0


def _truncate_pair(a: list[int], b: list[int], max_tokens: int, rng: random.Random) -> None:
    """BERT's truncate_seq_pair: trim the longer side, from the front or the back at random."""
    while len(a) + len(b) > max_tokens:
        longer = a if len(a) > len(b) else b
        del longer[0 if rng.random() < 0.5 else -1]
